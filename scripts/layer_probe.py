"""Probe: where an eager training step's non-matmul time goes, on 4 decoder layers of the 3B shape.

Runs fwd+bwd (training, LoRA all-linear r=16 dropout 0.05, bf16 autocast) and a no-grad forward
(prediction) at batch 24 x 576 tokens, for several variants: eager, torch's fused rms_norm, liger's
fused RMSNorm/SwiGLU/RoPE, no LoRA dropout, and each layer compiled. Prints ms per step.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq

B, T, LAYERS = 24, 576, 4


def make(dropout: float):
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=LAYERS,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=1024,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1),
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = mq.Qwen2_5_VLTextModel._from_config(
            cfg.text_config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    lcfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, lcfg)


def time_it(fn, n=10, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def run(name, model):
    emb = torch.randn(B, T, 2048, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda").expand(3, B, T)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        model.train()
        with torch.autocast("cuda", torch.bfloat16):
            h = model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        loss = h[:, -4:].float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            model(inputs_embeds=emb, position_ids=pos)

    row = {"variant": name, "train_ms": time_it(train), "infer_ms": time_it(infer)}
    print(json.dumps(row), flush=True)
    return row


def profile(model, path):
    emb = torch.randn(B, T, 2048, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda").expand(3, B, T)
    model.train()

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            h = model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        h[:, -4:].float().pow(2).mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    open(path, "w").write(table)
    print(table[:6000])


def main(out_dir: str):
    rows = []
    originals = (mq.Qwen2_5_VLRMSNorm.forward, mq.Qwen2MLP.forward, mq.apply_rotary_pos_emb)

    m = make(0.05)
    rows.append(run("eager", m))
    profile(m, f"{out_dir}/probe_profile_eager.txt")

    def torch_norm(self, x):
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.variance_epsilon)

    mq.Qwen2_5_VLRMSNorm.forward = torch_norm
    rows.append(run("rms_torch", m))

    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def liger_norm(self, x):
        return LigerRMSNormFunction.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", False)

    def liger_mlp(self, x):
        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

    mq.Qwen2_5_VLRMSNorm.forward = liger_norm
    rows.append(run("liger_norm", m))
    mq.Qwen2MLP.forward = liger_mlp
    rows.append(run("liger_norm_swiglu", m))
    mq.apply_rotary_pos_emb = liger_rotary_pos_emb
    rows.append(run("liger_all3", m))
    profile(m, f"{out_dir}/probe_profile_liger.txt")
    mq.Qwen2_5_VLRMSNorm.forward, mq.Qwen2MLP.forward, mq.apply_rotary_pos_emb = originals

    m0 = make(0.0)
    rows.append(run("no_dropout", m0))
    del m0

    for layer in m.base_model.model.layers:
        layer.compile()
    rows.append(run("compiled_layers", m))
    json.dump(rows, open(f"{out_dir}/probe.json", "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
