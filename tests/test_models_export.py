"""Merged export: standalone folder, same logits as base+adapter, and not the base itself."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from vlmexp.config import load_config
from vlmexp.models import tiny
from vlmexp.models.export import export_merged
from vlmexp.models.load import load_model

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which label? 退款"}]}]


def _adapter(cfg, out_dir):
    """A saved LoRA adapter whose B weights are random, so it is not the identity.

    Seeded (LoRA's A is drawn from the global RNG) and of a trained adapter's size: B ~ N(0, 0.5^2)
    with alpha/r = 16 made the delta ~8x the base weights, attention scores in the thousands, and
    fp32 rounding alone moved a logit by 7e-4 on CI's CPU (seed 3 here). At 0.05 the merge check
    sees ~1e-6 while the adapter still moves logits by > 0.5."""
    torch.manual_seed(0)
    model = load_model(cfg, training=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out_dir)
    return out_dir


def _logits(folder, family):
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    image = Image.new("RGB", (50, 40), (10, 200, 10))
    inputs = processor(text=[text], images=[[image]] if family == "smolvlm" else [image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_export_merged_matches_adapter(family, tmp_path):
    cfg = load_config(
        [f"model.name=tiny:{family}", f"model.cache_dir={tmp_path / 'cache'}", "lora.vision=true"]
    )
    adapter = _adapter(cfg, tmp_path / "adapter")
    result = export_merged(cfg, adapter, tmp_path / "merged")

    assert result["out_dir"] == str(tmp_path / "merged")
    assert 0 <= result["max_abs_diff"] < 1e-4
    merged_dir = tmp_path / "merged"
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    assert isinstance(AutoProcessor.from_pretrained(merged_dir), ProcessorMixin)
    # no leftover LoRA weights in the merged checkpoint
    merged_model = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    # the adapter really changed the model: merged logits differ from the base's
    base_dir = tmp_path / "cache" / family
    diff = (_logits(merged_dir, family) - _logits(base_dir, family)).abs().max()
    assert diff > 1e-3


def test_export_refuses_to_overwrite(tmp_path):
    cfg = load_config(["model.name=tiny:llava", f"model.cache_dir={tmp_path / 'cache'}", "lora.r=2"])
    adapter = _adapter(cfg, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="force"):
        export_merged(cfg, adapter, out)
    assert (out / "keep.txt").read_text() == "precious"
    export_merged(cfg, adapter, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_export_rejects_non_adapter(tmp_path):
    cfg = load_config(["model.name=tiny:llava", f"model.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        export_merged(cfg, tmp_path / "nothing", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.gpu
def test_export_merged_on_cuda(tmp_path):
    # export forces fp32 for the check, even where the auto dtype would be bf16
    cfg = load_config(["model.name=tiny:qwen2_vl", f"model.cache_dir={tmp_path / 'cache'}"])
    adapter = _adapter(cfg, tmp_path / "adapter")
    assert export_merged(cfg, adapter, tmp_path / "merged")["max_abs_diff"] < 1e-4


def test_export_refuses_a_merge_that_lost_the_adapter(tmp_path, monkeypatch):
    """The logit check can fail: a merge that drops the adapter (peft's `unload`) is not saved."""
    from peft import PeftModel

    # merge_and_unload lives on the tuner, reached through __getattr__; a class attribute wins
    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self, *a, **k: self.unload(), raising=False)
    cfg = load_config(["model.name=tiny:llava", f"model.cache_dir={tmp_path / 'cache'}", "lora.r=2"])
    adapter = _adapter(cfg, tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="differs from base"):
        export_merged(cfg, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
