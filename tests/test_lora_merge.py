"""speed.predict_merge (engine/lora_merge.py): prediction runs each LoRA layer as one merged matmul, with
the same scores, and leaves the base weights bit-for-bit as they were."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vlmexp.config import load_config
from vlmexp.engine.lora_merge import mergeable_layers, merged_lora
from vlmexp.engine.predict import predict
from vlmexp.models.load import load_model, load_processor
from vlmexp.tables import prob_columns


def _model(tiny_models, family: str = "qwen2_vl", *extra: str):
    cfg = load_config([f"model.name={tiny_models(family)}", "lora.dropout=0", *extra])
    torch.manual_seed(0)
    model = load_model(cfg)
    for name, p in model.named_parameters():  # B = 0 at init: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return cfg, model.eval()


def _lora_a_calls(model) -> list[int]:
    calls = [0]
    for n, m in model.named_modules():
        if n.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm", "gemma3"])
def test_merged_forward_equals_the_adapter_forward_and_restores_the_base(tiny_models, family):
    _, model = _model(tiny_models, family)
    layers = mergeable_layers(model)
    assert layers
    before = {id(m): (m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in layers}
    ids = torch.arange(3, 43).reshape(2, 20) % 100 + 3
    calls = _lora_a_calls(model)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        assert calls[0] > 0
        calls[0] = 0
        with merged_lora(model) as n:
            merged = model(input_ids=ids).logits
        assert n == len(layers) and calls[0] == 0  # inside, no adapter matmul ran
        again = model(input_ids=ids).logits
    torch.testing.assert_close(merged, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged, model.get_base_model()(input_ids=ids).logits)  # the adapter counted
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    for m in layers:
        weight, copy = before[id(m)]
        assert m.get_base_layer().weight is weight and torch.equal(weight, copy)
        assert not m.disable_adapters


def test_off_or_unmergeable_runs_the_adapters(tiny_models):
    _, model = _model(tiny_models)
    with merged_lora(model, enabled=False) as n:
        assert n == 0
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    dora = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert mergeable_layers(dora) == []  # DoRA's magnitude vector does not fold into W + B @ A
    with merged_lora(dora) as n:
        assert n == 0
    plain = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
        LoraConfig(r=2, target_modules=["0", "2"]),
    )
    assert len(mergeable_layers(plain)) == 2


def test_prediction_merges_and_keeps_the_scores(tiny_models, noise_samples, monkeypatch):
    import vlmexp.engine.lora_merge as lora_merge

    cfg, model = _model(tiny_models)
    processor = load_processor(cfg)
    labels = ["red", "green", "blue"]
    samples = noise_samples(cfg, labels)
    calls = _lora_a_calls(model)
    fast = predict(cfg, model, processor, samples[:1], labels, progress=False)
    assert calls[0] > 0  # one image (e.g. a served request): merging would cost more than it saves
    calls[0] = 0
    monkeypatch.setattr(lora_merge, "MIN_SAMPLES", 4)  # this test's 4 images count as a large call
    off = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, predict_merge=False))
    plain = predict(off, model, processor, samples, labels, progress=False)
    assert calls[0] > 0
    calls[0] = 0
    fast = predict(cfg, model, processor, samples, labels, progress=False)
    assert calls[0] == 0  # the default merges
    assert list(fast["pred"]) == list(plain["pred"])
    np.testing.assert_allclose(fast[prob_columns(labels)], plain[prob_columns(labels)], atol=1e-5)


@pytest.mark.gpu
def test_on_cuda_in_bf16_merged_logits_match_and_the_base_is_restored(tiny_models):
    _, model = _model(tiny_models, "qwen2_5_vl", "model.dtype=bfloat16")
    model = model.cuda()
    layers = mergeable_layers(model)
    copies = [m.get_base_layer().weight.detach().clone() for m in layers]
    ids = (torch.arange(3, 43).reshape(2, 20) % 100 + 3).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(input_ids=ids).logits.float()
        with merged_lora(model) as n:
            merged = model(input_ids=ids).logits.float()
    assert n == len(layers) > 0
    assert (merged.argmax(-1) == plain.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(merged, plain, rtol=0.05, atol=0.05)
    assert all(torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, copies, strict=True))
