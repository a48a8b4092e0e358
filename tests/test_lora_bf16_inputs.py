"""speed.lora_bf16_inputs: under bf16 autocast LoRA layers take their bf16 input as it is (no fp32 copy
that autocast casts back), with the same loss and gradients; never without autocast."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from peft.helpers import disable_input_dtype_casting

from vlmexp.config import load_config
from vlmexp.engine.trainer import autocasting
from vlmexp.models.load import load_model


def _lora_model(tiny_models):
    cfg = load_config([f"model.name={tiny_models('qwen2_vl')}", "model.dtype=bfloat16", "lora.dropout=0"])
    torch.manual_seed(0)
    model = load_model(cfg)
    for name, p in model.named_parameters():  # B = 0 at init: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _step(model, skip_cast: bool) -> tuple[float, dict[str, torch.Tensor], set[torch.dtype]]:
    """Loss, LoRA gradients and the dtypes lora_A layers received, for one text-only batch."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
        for n, m in model.named_modules()
        if n.endswith("lora_A.default")
    ]
    ids = torch.arange(3, 43).reshape(2, 20) % 100 + 3
    model.zero_grad()
    with disable_input_dtype_casting(model, active=skip_cast), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, seen


def test_bf16_inputs_give_the_same_loss_and_gradients_without_the_fp32_copy(tiny_models):
    model = _lora_model(tiny_models)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    loss_cast, grads_cast, seen_cast = _step(model, skip_cast=False)
    loss, grads, seen = _step(model, skip_cast=True)
    assert seen_cast == {torch.float32} and seen == {torch.bfloat16}  # the copy is gone
    assert grads and grads.keys() == grads_cast.keys()
    assert loss == loss_cast
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_cast[name], rtol=0, atol=0, msg=name)


def test_only_under_autocast():
    def trainer(native_amp: bool, precision: str):
        return SimpleNamespace(accelerator=SimpleNamespace(native_amp=native_amp, mixed_precision=precision))

    assert autocasting(trainer(True, "bf16"))
    assert not autocasting(trainer(False, "no"))  # fp32 CPU training: LoRA weights and inputs agree
    assert not autocasting(trainer(True, "no"))
    assert not autocasting(SimpleNamespace())


def test_bf16_prediction_runs_lora_in_bf16_and_keeps_the_predictions(tiny_models, noise_samples):
    import dataclasses

    import numpy as np

    from vlmexp.engine.predict import predict
    from vlmexp.models.load import load_processor
    from vlmexp.tables import prob_columns

    model = _lora_model(tiny_models)
    # unmerged LoRA (speed.predict_merge=false): the layers' inputs are what this test looks at
    cfg = load_config(
        [f"model.name={tiny_models('qwen2_vl')}", "model.dtype=bfloat16", "speed.predict_merge=false"]
    )
    processor = load_processor(cfg)
    labels = ["red", "green", "blue"]
    samples = noise_samples(cfg, labels)
    seen: set[torch.dtype] = set()
    for n, m in model.named_modules():
        if n.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    off = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, predict_autocast=False))
    plain = predict(off, model, processor, samples, labels, progress=False)
    assert seen == {torch.float32}
    seen.clear()
    fast = predict(cfg, model, processor, samples, labels, progress=False)
    assert seen == {torch.bfloat16}
    assert list(fast["pred"]) == list(plain["pred"])
    # bf16 rounding of the LoRA delta only: probabilities within a few bf16 ulps
    np.testing.assert_allclose(fast[prob_columns(labels)], plain[prob_columns(labels)], atol=2e-2)


def test_the_trainer_step_turns_the_cast_off_and_back_on(tiny_models, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    import vlmexp.engine.trainer as engine_trainer
    from vlmexp.models.load import load_processor

    cfg = load_config([f"model.name={tiny_models('qwen2_vl')}", "train.report_to=none", "train.batch_size=1"])
    model = load_model(cfg)
    examples = [
        {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "completion": "a", "images": []}
    ]
    trainer = engine_trainer.build_trainer(cfg, model, load_processor(cfg), examples, tmp_path)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    during: list[set[bool]] = []
    real_loss = type(trainer).compute_loss

    def spy(self, *a, **kw):
        during.append({getattr(m, "cast_input_dtype_enabled", True) for m in layers})
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(type(trainer), "compute_loss", spy)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this step runs outside of
    monkeypatch.setattr(engine_trainer, "autocasting", lambda _t: True)  # as under a GPU's bf16 autocast
    trainer.training_step(trainer.model, batch)
    found = trainer._tuner_layers
    assert found is not None and found[1] == layers  # every peft layer, found once for the fold
    monkeypatch.setattr(engine_trainer, "autocasting", lambda _t: False)  # fp32 CPU training: nothing changes
    trainer.training_step(trainer.model, batch)
    assert layers and during == [{False}, {True}]
    assert trainer._tuner_layers is found  # the second step did not walk the model again
    assert {getattr(m, "cast_input_dtype_enabled", True) for m in layers} == {True}  # back on after
