"""speed.lora_fused (engine/lora_fused.py): LoRA's up-projection, scaling and add as one addmm in the
training step, with peft's loss and gradients."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vlmexp.config import Config, load_config
from vlmexp.engine.lora_fused import fused_lora
from vlmexp.engine.trainer import build_trainer
from vlmexp.models.load import load_model, load_processor


def _model(tiny_models, family: str, dropout: float = 0.0):
    cfg = load_config([f"model.name={tiny_models(family)}", f"lora.dropout={dropout}"])
    torch.manual_seed(0)
    model = load_model(cfg, training=True)
    for name, p in model.named_parameters():  # B = 0 at init: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def _loss_and_grads(model, ids, seed: int = 0) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients, and how many times a lora_B module ran its own forward."""
    calls = [0]
    hooks = [
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for n, m in model.named_modules()
        if n.endswith("lora_B.default")
    ]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both passes
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, calls[0]


@pytest.mark.parametrize(("family", "dropout"), [("qwen2_vl", 0.0), ("smolvlm", 0.0), ("qwen2_5_vl", 0.3)])
def test_fused_gives_peft_s_loss_and_gradients(tiny_models, family, dropout):
    model = _model(tiny_models, family, dropout)
    ids = torch.arange(3, 43).reshape(2, 20) % 100 + 3
    loss, grads, calls = _loss_and_grads(model, ids)
    with fused_lora():
        fused, fused_grads, fused_calls = _loss_and_grads(model, ids)
    assert calls > 0 and fused_calls == 0  # lora_B's weight went into addmm, its module never ran
    assert abs(fused - loss) < 1e-5, (fused, loss)
    assert fused_grads.keys() == grads.keys() and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    _, _, after = _loss_and_grads(model, ids)
    assert after == calls  # peft's forward is back


def test_bf16_under_autocast_stays_within_rounding(tiny_models):
    model = _model(tiny_models, "qwen2_vl").to(torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # trainable LoRA weights stay fp32, as load_model keeps them
    ids = torch.arange(3, 43).reshape(2, 20) % 100 + 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = _loss_and_grads(model, ids)
        with fused_lora():
            fused, _, calls = _loss_and_grads(model, ids)
    assert calls == 0
    assert abs(fused - loss) < 2e-2 * max(1.0, abs(loss)), (fused, loss)


def test_other_layers_run_peft_s_forward():
    torch.manual_seed(0)
    dora = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], use_dora=True)
    )
    x = torch.randn(3, 8)
    with torch.no_grad():
        plain = dora(x)
        with fused_lora():
            torch.testing.assert_close(dora(x), plain, rtol=0, atol=0)
    # fp32 LoRA on a bf16 layer without autocast: addmm takes one dtype, so peft's forward runs
    net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    net.base_model.model[0].base_layer.to(torch.bfloat16)
    with torch.no_grad():
        plain = net(x.bfloat16())
        with fused_lora():
            torch.testing.assert_close(net(x.bfloat16()), plain, rtol=0, atol=0)
    with fused_lora(active=False):
        pass


def test_the_trainer_step_runs_fused_only_with_the_switch(tiny_models, tmp_path, monkeypatch):
    import vlmexp.engine.lora_fused as lf

    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    cfg.train.batch_size, cfg.train.eval, cfg.train.report_to = 1, False, "none"
    model = load_model(cfg, training=True)
    examples = [
        {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "completion": "a", "images": []}
    ]
    trainer = build_trainer(cfg, model, load_processor(cfg), examples, tmp_path)
    assert trainer.lora_fused  # the default
    fused = [0]
    real = lf._fused_forward
    monkeypatch.setattr(
        lf, "_fused_forward", lambda *a, **kw: fused.__setitem__(0, fused[0] + 1) or real(*a, **kw)
    )
    trainer.current_gradient_accumulation_steps = 1  # set by the trainer's loop, which this test skips
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.training_step(model, dict(batch))
    assert fused[0] > 0
    fused[0] = 0
    trainer.lora_fused = False  # speed.lora_fused=false
    trainer.training_step(model, dict(batch))
    assert fused[0] == 0


@pytest.mark.gpu
def test_on_cuda_in_bf16_the_fused_step_keeps_loss_and_gradients(tiny_models):
    model = _model(tiny_models, "qwen2_5_vl").cuda()
    ids = (torch.arange(3, 43).reshape(2, 20) % 100 + 3).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads, _ = _loss_and_grads(model, ids)
        with fused_lora():
            fused, fused_grads, calls = _loss_and_grads(model, ids)
    assert calls == 0
    assert abs(fused - loss) < 2e-2 * max(1.0, abs(loss)), (fused, loss)
    for name, g in grads.items():  # bf16 matmuls: compare directions, not digits
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
