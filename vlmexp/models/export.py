"""Merge a LoRA adapter into its base and save a standalone model folder, checked for equality.

The folder loads with `AutoModelForImageTextToText.from_pretrained(out_dir)` or `vllm serve out_dir`
and carries the processor, so predict.backend=openai can serve what a fold trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlmexp.config import Config
from vlmexp.engine.cls_head import copy_head
from vlmexp.engine.samples import template_kwargs
from vlmexp.models.load import load_for_inference, load_processor

# Logits of the merged model must match base+adapter this closely in fp32, relative to the
# logits' scale: a 7B model's logits reach ~30, where fp32 rounding of W + BA alone is ~1e-5 per unit.
TOLERANCE = 1e-4


def _probe_inputs(processor, samples: list | None) -> list[dict]:
    """Processor inputs to compare on: `samples` are {"messages", "images"} dicts (trl's format) or
    None for two synthetic image + text chats."""
    if not samples:
        msg = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which class is this?"}]}
        ]
        colours = [(220, 40, 40), (40, 40, 220)]
        samples = [{"messages": msg, "images": [Image.new("RGB", (64, 48), c)]} for c in colours]
    out = []
    for s in samples:
        text = processor.apply_chat_template(
            s["messages"], add_generation_prompt=True, **template_kwargs(processor)
        )
        images = s.get("images") or None
        out.append(processor(text=[text], images=images, return_tensors="pt"))
    return out


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 while checking: cuDNN's default TF32 convolutions (Qwen's patch embedding) alone
    move tiny-model logits by ~5e-4 on an H100."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def _logits(model, inputs: list[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with _exact_fp32():
        return [model(**{k: v.to(device) for k, v in x.items()}).logits.float().cpu() for x in inputs]


def export_merged(
    cfg: Config,
    adapter_dir: Path,
    out_dir: Path,
    check_samples: list | None = None,
    *,
    force: bool = False,
) -> dict:
    """Merge `adapter_dir` into `cfg.model`'s base, save model + processor to `out_dir`, and check
    that the reloaded folder gives the same logits as base+adapter. Returns {"max_abs_diff", "out_dir"}."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass force=True (--force) to overwrite it")
    if cfg.model.quant != "none":
        # merging into 4-bit weights rounds the adapter away; merge into the unquantised base instead
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant="none"))
    # fp32 for the check (bf16 rounding alone exceeds the tolerance), and so the folder is saved in
    # fp32 too: serve it with e.g. `vllm serve OUT --dtype bfloat16` to halve its memory.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))

    processor = load_processor(cfg)
    model = load_for_inference(cfg, adapter_dir)
    inputs = _probe_inputs(processor, check_samples)
    reference = _logits(model, inputs)
    merged = model.merge_and_unload()
    device = next(merged.parameters()).device

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # write beside out_dir and swap in at the end, so a failed export never leaves a half folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server may run as another user
    try:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        copy_head(adapter_dir, tmp)  # model.head=cls: the head travels with the merged weights
        del model, merged  # a 7B model in fp32 is 28 GB: hold one copy at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # reload onto the same device: CPU and GPU kernels differ by more than the tolerance
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32, device_map=device)
        reloaded.eval()
        diff = max(
            float((a - b).abs().max()) for a, b in zip(reference, _logits(reloaded, inputs), strict=True)
        )
        bound = TOLERANCE * max(1.0, max(float(r.abs().max()) for r in reference))
        if not diff < bound:
            raise RuntimeError(
                f"merged model differs from base+adapter {adapter_dir}: max |logit diff| = {diff:.3g} "
                f">= {bound:.3g}; not saved to {out_dir}"
            )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"max_abs_diff": diff, "out_dir": str(out_dir), "dtype": "float32"}
