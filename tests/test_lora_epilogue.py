"""speed.lora_addmm (engine/lora_epilogue.py): LoRA's scale and add in lora_B's matmul epilogue.

Under bf16 autocast the fused sum equals peft's within a bf16 rounding (one rounding instead of three)
and trains the same adapter weights; outside autocast, and for every adapter setup the epilogue does
not cover, peft's own forward runs and the output is bit-equal."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForImageTextToText

from vlmexp.config import load_config
from vlmexp.engine import speed
from vlmexp.engine.lora_epilogue import fuse_lora_epilogue
from vlmexp.models.lora import apply_lora


class CountAddmm(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.addmm
        return func(*args, **(kwargs or {}))


def _lora_model(tiny_models, **lora):
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl"), dtype=torch.bfloat16)
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "o_proj"]}
    model = get_peft_model(base, LoraConfig(**(settings | lora)))
    for name, p in model.named_parameters():  # lora_B starts at zero: give it weight so the sum matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def _inputs(model) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, 10), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _step(model, inputs, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(**inputs).logits
    if logits.requires_grad:  # not with the adapter disabled or merged: nothing trainable is used
        logits.float().pow(2).mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


def test_under_autocast_the_epilogue_runs_and_matches_peft_within_bf16_rounding(tiny_models):
    model = _lora_model(tiny_models)
    inputs = _inputs(model)
    plain_logits, plain_grads = _step(model, inputs, autocast=True)
    n = fuse_lora_epilogue(model)
    assert (
        n == 2 * model.config.text_config.num_hidden_layers
    )  # q_proj and o_proj of each decoder layer (the tower has neither)
    with CountAddmm() as counted:
        fused_logits, fused_grads = _step(model, inputs, autocast=True)
    assert counted.calls == n  # every LoRA layer took the epilogue
    scale = plain_logits.abs().max()
    torch.testing.assert_close(fused_logits, plain_logits, rtol=0, atol=2e-2 * scale)
    assert plain_grads.keys() == fused_grads.keys() and any("lora_A" in k for k in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max(), msg=name)
    assert fuse_lora_epilogue(model) == 0  # patched layers are not patched again


@pytest.mark.parametrize("case", ["no_autocast", "disabled", "merged", "dora", "lora_bias", "two_adapters"])
def test_setups_the_epilogue_does_not_cover_run_peft_bit_for_bit(tiny_models, case):
    lora = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora_bias" else {}
    model = _lora_model(tiny_models, **lora)
    if case == "two_adapters":
        model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
        model.base_model.set_adapter(["default", "second"])
    inputs = _inputs(model)
    autocast = case != "no_autocast"

    def outputs():
        if case == "disabled":
            with model.disable_adapter():
                return _step(model, inputs, autocast)[0]
        return _step(model, inputs, autocast)[0]

    if case == "merged":
        model.merge_adapter()
    plain = outputs()
    fuse_lora_epilogue(model)
    with CountAddmm() as counted:
        fused = outputs()
    assert counted.calls == 0
    assert torch.equal(fused, plain)


def _lora_layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def test_prepare_patches_each_new_adapter_on_cuda_only(tiny_models, monkeypatch):
    """A shared base (speed.reuse_base): fold 1's fresh adapter is patched although the base's record
    says it is prepared; off CUDA nothing is."""
    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}"])
    base = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl"), dtype=torch.float32)
    fold0 = apply_lora(base, cfg)
    speed.prepare(fold0, cfg)
    assert not any("forward" in m.__dict__ for m in _lora_layers(fold0))
    monkeypatch.setattr(speed, "on_cuda", lambda model: True)
    speed.prepare(fold0, cfg)
    assert _lora_layers(fold0) and all("forward" in m.__dict__ for m in _lora_layers(fold0))
    fold1 = apply_lora(fold0.unload(), cfg)
    speed.prepare(fold1, cfg)
    assert all(
        "forward" in m.__dict__ for m in fold1.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
    )
    off = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.lora_addmm=false"])
    fold2 = apply_lora(fold1.unload(), off)
    speed.prepare(fold2, off)
    assert not any("forward" in m.__dict__ for m in _lora_layers(fold2))


@pytest.mark.gpu
def test_on_cuda_a_3b_sized_lora_layer_matches_peft_within_bf16_rounding():
    """The cuBLAS epilogue on the GPU, a gate_proj of the 3B shape (2048 -> 11008, r=16) at 1,024
    tokens under bf16 autocast: output and adapter gradients as peft's within bf16 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(2048, 11008, bias=False)).cuda().to(torch.bfloat16)
    model = get_peft_model(layer, LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight, std=0.02)
    x = torch.randn(4, 256, 2048, device="cuda", dtype=torch.bfloat16)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return out.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    assert fuse_lora_epilogue(model) == 1
    with CountAddmm() as counted:
        fused, fused_grads = run()
    assert counted.calls == 1
    torch.testing.assert_close(fused, plain, rtol=1.6e-2, atol=1e-2 * plain.abs().max())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max(), msg=name)
