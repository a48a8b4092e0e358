"""train.batch_size=auto (engine/autobatch.py): the batch from free memory, the lr rule in one place."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest

from vlmexp.config import ConfigError, load_config
from vlmexp.engine import autobatch, memory
from vlmexp.models.load import load_model, load_processor


def _auto(tiny_models, **train):
    cfg = load_config([f"model.name={tiny_models('qwen2_vl')}", "train.batch_size=auto"])
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def test_config_takes_auto_or_a_number_and_refuses_other_words():
    assert load_config(["train.batch_size=auto"]).train.batch_size == "auto"
    assert load_config(["train.batch_size=16"]).train.batch_size == 16
    with pytest.raises(ConfigError, match="give a number >= 1 or auto"):
        load_config(["train.batch_size=big"])
    with pytest.raises(ConfigError, match="lr_rule"):
        load_config(["train.lr_rule=cube"])


def test_lr_rules():
    assert autobatch.scaled_lr(2e-4, 24, "sqrt") == pytest.approx(2e-4 * math.sqrt(3))
    assert autobatch.scaled_lr(2e-4, 24, "linear") == pytest.approx(6e-4)
    assert autobatch.scaled_lr(2e-4, 24, "none") == 2e-4
    assert autobatch.scaled_lr(2e-4, 8, "sqrt") == 2e-4  # the base batch keeps train.lr


def test_without_a_gpu_auto_falls_back_to_8_and_says_so(tiny_models, caplog, monkeypatch):
    monkeypatch.setattr(autobatch.torch.cuda, "is_available", lambda: False)
    cfg = _auto(tiny_models)
    with caplog.at_level(logging.INFO, logger="vlmexp.engine.autobatch"):
        out = autobatch.resolve(cfg, load_model(cfg, training=True), None)
    assert out.train.batch_size == 8 and out.train.lr == cfg.train.lr
    assert "train.batch_size=auto: 8 (no GPU" in caplog.text


def test_auto_takes_the_largest_batch_that_fits_and_scales_lr(tiny_models):
    cfg = _auto(tiny_models, lr_rule="sqrt")
    model = load_model(cfg, training=True)
    tokens, patches = 600, 64
    need_24 = memory.activation_bytes(model, 24, tokens, patches)
    need_32 = memory.activation_bytes(model, 32, tokens, patches)
    free = int(need_24 * autobatch.MARGIN) + 1  # 24 fits with the margin, 32 does not
    assert need_32 * autobatch.MARGIN > free
    out = autobatch.resolve(cfg, model, (tokens, patches), free_bytes=free)
    assert out.train.batch_size == 24
    assert out.train.lr == pytest.approx(cfg.train.lr * math.sqrt(3))
    explicit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=16))
    assert autobatch.resolve(explicit, model, (tokens, patches), free_bytes=free) is explicit  # lr as given


def test_build_trainer_never_hands_auto_to_the_trainer(tiny_models, tmp_path):
    from vlmexp.engine.trainer import build_trainer

    cfg = _auto(tiny_models)
    model = load_model(cfg, training=True)
    examples = [
        {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "completion": "a", "images": []}
    ]
    trainer = build_trainer(cfg, model, load_processor(cfg), examples, tmp_path)
    assert trainer.args.per_device_train_batch_size == 8  # the CPU fallback
    assert trainer.args.learning_rate == cfg.train.lr


def test_auto_is_the_default_and_a_sharded_fold_gets_the_base_batch_in_multiples_of_its_ranks():
    cfg = load_config([])
    assert cfg.train.batch_size == "auto"
    for n, batch in ((2, 8), (4, 8), (3, 9), (16, 16)):
        sharded = load_config([f"train.gpus_per_fold={n}", "train.eval=false"])
        out = autobatch.resolve(sharded, model=None, shape=None, free_bytes=10**15)
        assert out.train.batch_size == batch and out.train.batch_size % n == 0
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_config(["train.gpus_per_fold=4", "train.batch_size=6", "train.eval=false"])


def test_head_cls_trains_with_auto(tiny_models, tmp_path):
    import numpy as np
    import pandas as pd
    from PIL import Image

    from vlmexp.engine.cls_head import build_head_trainer
    from vlmexp.engine.samples import build_samples
    from vlmexp.prompts import load_template

    cfg = load_config([f"model.name={tiny_models('qwen2_vl')}", "model.head=cls", "train.report_to=none"])
    assert cfg.train.batch_size == "auto"
    model, processor = load_model(cfg), load_processor(cfg)
    Image.fromarray(np.zeros((40, 56, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    df = pd.DataFrame([{"id": "0", "image": str(tmp_path / "0.png"), "label": "a"}])
    tpl = load_template("baseline")
    samples = build_samples(df, labels=["a", "b"], descriptions={}, template=tpl, cfg=cfg)
    trainer = build_head_trainer(cfg, model, processor, samples, ["a", "b"], tmp_path / "out")
    assert trainer.args.per_device_train_batch_size == autobatch.BASE_BATCH  # no GPU here: the base batch


def test_compile_keeps_the_batch_and_uses_the_compiled_fit_for_checkpointing(tiny_models, monkeypatch):
    # run K on an H200: compiled steps peaked at <= 0.67 of the eager estimate (41 of 61 GiB, 58 of 91);
    # run S: letting that estimate pick the batch (32 instead of 24) cost 0.694 -> 0.616 CV
    from vlmexp.engine import speed

    cfg = _auto(tiny_models)
    model = load_model(cfg, training=True)
    tokens, patches = 600, 0
    lora = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    eager, fused = (memory.activation_bytes(model, 24, tokens, patches, c) - lora for c in (False, True))
    assert fused == pytest.approx(eager * memory.COMPILED_FIT, rel=1e-6)
    free = int(memory.activation_bytes(model, 24, tokens, patches) * autobatch.MARGIN) + 1
    assert autobatch.choose(model, tokens, patches, free)[0] == 24
    compiled = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, compile=True))
    monkeypatch.setattr(speed, "on_cuda", lambda model: True)
    assert speed.compiles(model, compiled)
    for c in (cfg, compiled):  # the same batch and lr whether or not the layers are compiled
        out = autobatch.resolve(c, model, (tokens, patches), free_bytes=free)
        assert (out.train.batch_size, out.train.lr) == (24, autobatch.scaled_lr(cfg.train.lr, 24, "sqrt"))
    need_on, _ = memory.gradient_checkpointing_needed("auto", model, 32, tokens, patches, free_bytes=free)
    need_off, _ = memory.gradient_checkpointing_needed(
        "auto", model, 32, tokens, patches, free_bytes=free, compiled=True
    )
    assert need_on and not need_off  # batch 32 compiled fits without checkpointing, eager does not


def test_memory_torch_caches_counts_as_free_so_later_folds_decide_as_the_first(monkeypatch):
    # A run keeps torch's GPU cache between folds (recipe._free_memory); a fold that counted only the
    # driver's free memory would see fold 0's cached activations as taken and pick a smaller batch.
    import torch

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 70 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 8 * gib)
    assert memory.free_gpu_bytes() == 72 * gib
    monkeypatch.setattr(memory, "activation_bytes", lambda *a, **k: 40 * gib)
    on, why = memory.gradient_checkpointing_needed("auto", None, 8, 512, 1024)
    assert not on and "72.0 GiB free" in why  # 40 x 1.3 fits in 72, not in the driver's 10
    batch, why = autobatch.choose(None, 512, 1024)
    assert batch == autobatch.CANDIDATES[-1] and "fit in 72.0 GiB free" in why
