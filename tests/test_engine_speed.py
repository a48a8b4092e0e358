"""The model is prepared for speed once per base model (engine/speed.py): a second `prepare`, a new
adapter on the same base, and the next fold of a run on a shared base (speed.reuse_base) apply nothing.

The levers are CUDA-only, so these tests pretend CUDA (`speed.on_cuda`) and count the lever calls."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmexp.config import load_config
from vlmexp.engine import speed


@pytest.fixture()
def counted(monkeypatch) -> dict[str, int]:
    """CUDA pretended and every lever replaced by a counter: {lever: calls}."""
    calls = {"vision_attention": 0, "tower": 0, "fused_norm": 0, "compile": 0}

    def attention(model):
        calls["vision_attention"] += 1
        return 4

    def tower(model, cfg):
        calls["tower"] += 1
        return {"vision_pad": 4}

    def fuse_norms(model):
        calls["fused_norm"] += 1
        return 3

    def compile_blocks(model, dynamic=False):
        calls["compile"] += 1
        compile_blocks.dynamic.append(dynamic)
        return 2

    compile_blocks.dynamic = []  # the `dynamic` argument of each call

    monkeypatch.setattr(speed, "on_cuda", lambda model: True)
    monkeypatch.setattr(speed, "patch_vision_attention", attention)
    monkeypatch.setattr(speed, "prepare_tower", tower)
    monkeypatch.setattr(speed, "fuse_norms", fuse_norms)
    monkeypatch.setattr(speed, "compile_blocks", compile_blocks)
    return calls


def _model(tiny_models, family: str = "qwen2_5_vl"):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(tiny_models(family), dtype=torch.float32)


def test_a_second_prepare_applies_nothing(tiny_models, counted, caplog):
    from vlmexp.models.lora import apply_lora

    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.compile=true"])
    model = _model(tiny_models)
    caplog.set_level(logging.DEBUG, logger="vlmexp.engine.speed")
    first = speed.prepare(model, cfg)
    assert first == {"vision_attention": 4, "vision_pad": 4, "fused_norm": 3, "compile": 2}
    assert counted == {"vision_attention": 1, "tower": 1, "fused_norm": 1, "compile": 1}
    assert speed.prepare(model, cfg) == first
    # a LoRA adapter on the same base (the next fold on a shared base): the base is prepared already
    assert speed.prepare(apply_lora(model, cfg), cfg) == first
    # other settings later keep the first decision, said at debug level only
    plain = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.compile=false"])
    assert speed.prepare(model, plain, vision_patch=False) == first
    assert counted == {"vision_attention": 1, "tower": 1, "fused_norm": 1, "compile": 1}
    said = [r for r in caplog.records if r.name == "vlmexp.engine.speed"]
    assert [r.levelno for r in said if r.message.startswith("speed levers:")] == [logging.INFO]
    assert "speed levers: vision_attention=4 vision_pad=4 fused_norm=3 compile=2" in caplog.text
    assert any(r.levelno == logging.DEBUG and "keeping them" in r.message for r in said)
    speed.forget(model)  # what the bench does after undoing the levers: the next prepare applies them
    assert speed.prepared(model) is None
    assert speed.prepare(model, plain, vision_patch=False) == {"vision_pad": 4, "fused_norm": 3}
    assert counted == {"vision_attention": 1, "tower": 2, "fused_norm": 2, "compile": 1}


def test_off_cuda_nothing_is_applied_or_recorded(tiny_models, monkeypatch):
    def refuse(*args):
        raise AssertionError("a CUDA lever ran on the CPU")

    for name in ("patch_vision_attention", "prepare_tower", "fuse_norms", "compile_blocks"):
        monkeypatch.setattr(speed, name, refuse)
    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.compile=true"])
    model = _model(tiny_models)
    assert speed.prepare(model, cfg) == {}
    assert speed.prepared(model) is None  # moved to a GPU later, it would still be prepared there


def test_the_real_levers_run_once(tiny_models, monkeypatch):
    """Real window attention and MLP padding (both work on the CPU): the second call leaves the patched
    forwards and the padded weights exactly as the first call made them."""
    monkeypatch.setattr(speed, "on_cuda", lambda model: True)
    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}"])  # speed.compile off: no inductor here
    model = _model(tiny_models).eval().requires_grad_(False)
    blocks = model.model.visual.blocks
    done = speed.prepare(model, cfg)
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2_5_VLRMSNorm"]
    want = {"vision_attention": len(blocks), "vision_pad": len(blocks), "vision_patch_gemm": 1}
    assert done == want | {"fused_norm": len(norms)}
    forwards = [b.attn.__dict__["forward"] for b in blocks]
    weights = [b.mlp.down_proj.weight for b in blocks]
    assert speed.prepare(model, cfg) is done
    assert all(b.attn.__dict__["forward"] is f for b, f in zip(blocks, forwards, strict=True))
    assert all(b.mlp.down_proj.weight is w for b, w in zip(blocks, weights, strict=True))


@pytest.mark.slow
def test_a_base_shared_by_two_folds_is_prepared_once(tmp_path, counted, monkeypatch):
    """A 2-fold run on a shared base: training, validation and test predictions of both folds ask for
    the levers, and they are applied once."""
    from vlmexp.demo import make_demo
    from vlmexp.recipe import run_experiment

    asked = []
    real = speed.prepare
    monkeypatch.setattr(speed, "prepare", lambda model, cfg, **kw: asked.append(1) or real(model, cfg, **kw))
    demo = make_demo(tmp_path / "data", seed=0, n_train=24, n_test=12)
    cfg = load_config(
        [f"data.dir={demo}", f"runs_dir={tmp_path / 'runs'}", f"leaderboard={tmp_path / 'lb.csv'}",
         f"model.cache_dir={Path(tmp_path) / 'tiny'}", "folds=2", "train.epochs=1", "train.eval=true",
         "train.batch_size=8", "predict.batch_size=8", "train.report_to=none", "speed.reuse_base=true"]
    )  # fmt: skip
    run_experiment(cfg)
    assert len(asked) >= 6  # per fold: build_trainer, the validation evaluation, OOF and test predictions
    assert counted == {"vision_attention": 1, "tower": 1, "fused_norm": 1, "compile": 0}


@pytest.mark.gpu
def test_prepare_on_cuda_applies_the_real_levers_once_and_keeps_the_logits(tiny_models, monkeypatch):
    """On the GPU: the real window patch, MLP pad and compiled decoder layers, once; same logits."""
    # cuDNN's fp32 convolutions run in TF32 by default, the patch-embedding matmul (speed.vision_patch_gemm)
    # in full fp32: the reference must be fp32 too (run AS: 1.3e-4 apart with a TF32 reference)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from PIL import Image
    from transformers import AutoProcessor

    from vlmexp.engine.compile import uncompile_blocks

    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.compile=true"])
    model = _model(tiny_models).cuda().eval()
    processor = AutoProcessor.from_pretrained(tiny_models("qwen2_5_vl"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which label?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (112, 84), (200, 30, 30))], return_tensors="pt")
    inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        plain = model(**inputs).logits
        done = speed.prepare(model, cfg)
        assert done["compile"] == model.config.text_config.num_hidden_layers
        assert done["vision_attention"] >= 1 and "vision_pad" in done
        assert speed.prepare(model, cfg) is done  # the second call applies nothing
        fast = model(**inputs).logits
    uncompile_blocks(model)
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("settings", "dynamic"),
    [
        ([], False),
        (["speed.compile_dynamic=true"], True),
        (["speed.compile_dynamic=true", "speed.cudnn_attention=true"], False),
    ],
)
def test_decoder_layers_compile_static_unless_dynamic_is_asked_without_cudnn(
    tiny_models, counted, settings, dynamic
):
    """Static shapes by default (3B demo run: 188.4 s static, run S; dynamic unfinished at 230 s, run
    W); dynamic when asked, never with cuDNN's attention (its dynamic-shape inductor call failed)."""
    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}", "speed.compile=true", *settings])
    speed.prepare(_model(tiny_models), cfg)
    assert speed.compile_blocks.dynamic == [dynamic]
