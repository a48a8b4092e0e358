"""Tiny VLMs: build, reload through the Auto classes, forward an image + text chat; loader basics."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from vlmexp.config import load_config
from vlmexp.models import tiny
from vlmexp.models.load import load_model, load_processor, resolve_model_path

MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Which class? 退款页面 or label_a"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "退款页面"}]},
]


def _image_token_id(model) -> int:
    cfg = model.config
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_build_reload_forward(family, tiny_models):
    path = tiny_models(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, ProcessorMixin), type(processor)
    assert sum(p.numel() for p in model.parameters()) < 400_000

    text = processor.apply_chat_template(MESSAGES)
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    # Idefics3 (SmolVLM) wants one list of images per text
    images = [[image]] if family == "smolvlm" else [image]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == _image_token_id(model)).sum())
    # Gemma 4's processor allows no budget under 70 soft tokens an image
    assert 1 <= n_image_tokens <= (70 if family == "gemma4" else 16)

    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()

    # byte-level BPE: any text, CJK included, round-trips without unknown tokens
    tok = processor.tokenizer
    sample = "退款页面 label_b ünïcødé 🙂"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample


def test_trl_recognises_the_chat_templates():
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    assert tiny.QWEN2_VL_TEMPLATE == trl_templates.qwen2_5_vl_chat_template
    assert tiny.SMOLVLM_TEMPLATE == trl_templates.smolvlm_chat_template
    assert trl_templates.has_generation_markers(tiny.LLAVA_TEMPLATE)


@pytest.mark.parametrize(
    "family, trl_name",
    [
        ("qwen3_vl", "qwen3_vl"),
        ("qwen3_vl_moe", "qwen3_vl"),
        ("qwen3_5", "qwen3_5_think"),
        ("gemma3", "gemma3"),
        ("gemma4", "gemma4_v5"),
    ],
)
def test_recent_families_carry_the_hub_templates(family, trl_name, tiny_models):
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    processor = AutoProcessor.from_pretrained(tiny_models(family))
    assert processor.chat_template == getattr(trl_templates, f"{trl_name}_chat_template")
    assert processor.tokenizer.chat_template == processor.chat_template


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm", "qwen3_vl", "qwen3_5", "gemma3"])
def test_trl_patches_training_template(family, tiny_models):
    trl_templates = pytest.importorskip("trl.chat_template_utils")
    processor = AutoProcessor.from_pretrained(tiny_models(family))
    patched = trl_templates.get_training_chat_template(processor)
    assert patched is not None and trl_templates.has_generation_markers(patched)


def test_same_seed_same_weights(tmp_path):
    a = load_file(tiny.build_tiny("qwen2_5_vl", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(tiny.build_tiny("qwen2_5_vl", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(tiny.build_tiny("qwen2_5_vl", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    tok_a = (tmp_path / "a" / "tokenizer.json").read_text()
    assert tok_a == (tmp_path / "b" / "tokenizer.json").read_text()


def test_build_tiny_does_not_touch_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny("llava", tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_resolve_model_path_caches(tmp_path):
    cfg = load_config(["model.name=tiny:llava", f"model.cache_dir={tmp_path}"])
    first = resolve_model_path(cfg.model)
    assert first == str(tmp_path / "llava")
    weights = tmp_path / "llava" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model_path(cfg.model) == first
    assert weights.stat().st_mtime_ns == mtime
    # only the final folder is left: no temp build folders
    assert [p.name for p in tmp_path.iterdir()] == ["llava"]


def _resolve_in_child(cache_dir: str, queue) -> None:
    cfg = load_config(["model.name=tiny:qwen2_vl", f"model.cache_dir={cache_dir}"])
    queue.put(resolve_model_path(cfg.model))


def test_resolve_model_path_concurrent_and_after_crash(tmp_path):
    (tmp_path / ".qwen2_vl-crashed").mkdir()  # what a build killed half-way leaves behind
    ctx = multiprocessing.get_context("fork")  # fork: no re-import of torch per child
    queue = ctx.Queue()
    procs = [ctx.Process(target=_resolve_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(tmp_path / "qwen2_vl")}
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "qwen2_vl") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".qwen2_vl-crashed", "qwen2_vl"]


def test_resolve_model_path_rebuilds_stale_cache(tmp_path):
    cfg = load_config(["model.name=tiny:smolvlm", f"model.cache_dir={tmp_path}"])
    path = resolve_model_path(cfg.model)
    stamp = tmp_path / "smolvlm" / "vlmexp_tiny.json"
    stamp.write_text('{"transformers": "0.0"}')
    assert resolve_model_path(cfg.model) == path
    assert '"0.0"' not in stamp.read_text()


def test_resolve_model_path_passes_others_through():
    cfg = load_config(["model.name=Qwen/Qwen2-VL-2B-Instruct"])
    assert resolve_model_path(cfg.model) == "Qwen/Qwen2-VL-2B-Instruct"


def test_unknown_tiny_family_lists_families(tmp_path):
    with pytest.raises(ValueError, match="is not a tiny model.*tiny:qwen2_vl.*tiny:smolvlm.*tiny:llava"):
        load_config(["model.name=tiny:gpt5", f"model.cache_dir={tmp_path}"])  # refused with the config
    cfg = load_config([f"model.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="qwen2_vl.*qwen2_5_vl.*smolvlm.*llava"):
        resolve_model_path(dataclasses.replace(cfg.model, name="tiny:gpt5"))
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny.build_tiny("gpt5", tmp_path / "x")


def test_load_processor_applies_image_cfg(tmp_path):
    cfg = load_config(["model.name=tiny:qwen2_vl", f"model.cache_dir={tmp_path}", "image.max_pixels=3136"])
    processor = load_processor(cfg)
    inputs = processor(text=["<|image_pad|>"], images=[Image.new("RGB", (112, 112))], return_tensors="pt")
    # 56x56 px -> 4x4 patches of 14 -> 4 tokens after 2x2 merging (the default 112x112 gives 16)
    assert int(inputs["image_grid_thw"].prod()) // 4 == 4
    bad = load_config(["model.name=tiny:llava", f"model.cache_dir={tmp_path}", "image.max_pixels=3136"])
    with pytest.raises(ValueError, match="Qwen-VL style"):
        load_processor(bad)


def test_load_processor_longest_side_for_idefics3(tmp_path):
    cfg = load_config(["model.name=tiny:smolvlm", f"model.cache_dir={tmp_path}", "image.longest_side=24"])
    assert load_processor(cfg).image_processor.size["longest_edge"] == 24


def test_load_model_inference_and_full(tmp_path):
    base = ["model.name=tiny:qwen2_vl", f"model.cache_dir={tmp_path}"]
    model = load_model(load_config(base), training=False)
    assert not model.training and not hasattr(model, "peft_config")
    on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert next(model.parameters()).dtype == (torch.bfloat16 if on_gpu else torch.float32)  # auto dtype
    assert model.config._attn_implementation == "sdpa"  # no flash_attn installed
    full = load_model(load_config([*base, "model.finetune=full"]), training=True)
    assert not hasattr(full, "peft_config")
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(ValueError, match="4bit"):
        load_model(load_config([*base, "model.finetune=full", "model.quant=4bit"]))


def test_load_processor_fails_loud_on_bare_tokenizer(tiny_models, tmp_path):
    # a folder with only tokenizer files: AutoProcessor quietly returns the tokenizer
    src = tiny_models("qwen2_vl")
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg.pop("processor_class", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = load_config([f"model.name={tmp_path}"])
    with pytest.raises(RuntimeError, match="bare .*torchvision"):
        load_processor(cfg)


@pytest.mark.gpu
def test_load_model_cuda_defaults(tmp_path):
    cfg = load_config(["model.name=tiny:qwen2_5_vl", f"model.cache_dir={tmp_path}"])
    model = load_model(cfg, training=False)
    param = next(model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16  # auto dtype on a bf16 GPU
    processor = load_processor(cfg)
    text = processor.apply_chat_template(MESSAGES)
    inputs = processor(text=[text], images=[Image.new("RGB", (80, 80))], return_tensors="pt").to("cuda")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()
