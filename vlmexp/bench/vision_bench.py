"""`exp bench vision SHAPE`: the vision tower alone on new images, one lever added per row.

Rows: `eager` (transformers' own attention), `batched-windows` (vision_speed.patch_vision_attention, what
runs today), `padded` (+ vision_speed.pad_vision_mlp), `padded-host-inputs` (+ the grid-derived inputs
precomputed on the host, engine/vision_inputs.py, as the vision feature cache calls the tower),
`padded-compiled` (+ compile_vision_blocks).
Each row: the first call's seconds (compilation included), then images/s over `reps` calls after a
device sync, and the largest absolute difference of its features from the `eager` row's.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from vlmexp.engine import vision_speed
from vlmexp.engine.vision_inputs import tower_inputs

ROWS = ("eager", "batched-windows", "padded", "padded-host-inputs", "padded-compiled")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def vision_bench(
    shape: str = "qwen2.5-vl-3b",
    n_images: int = 32,
    resolution: int = 448,
    reps: int = 5,
    rows: tuple[str, ...] = ROWS,
):
    """The rows of `rows` (a prefix of ROWS: each adds its lever to the ones before)."""
    if rows != ROWS[: len(rows)]:
        raise ValueError(f"rows must be a prefix of {ROWS}: each row adds its lever to those before it")
    from vlmexp.bench.run import environment
    from vlmexp.bench.shapes import build_model, build_processor, get_shape

    sh = get_shape(shape)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(sh, device, dtype).eval().requires_grad_(False)
    processor = build_processor(sh, resolution)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
        for _ in range(n_images)
    ]
    enc = processor.image_processor(images=images, return_tensors="pt")
    pixels, grid = enc["pixel_values"].to(device, dtype), enc["image_grid_thw"].to(device)
    host_grid = enc["image_grid_thw"]
    core = model.model
    host_inputs = False

    def features() -> torch.Tensor:
        with torch.no_grad():
            if host_inputs:  # computed per call, as VisionFeatureCache.features does
                pre = tower_inputs(core.visual, host_grid, device)
                out = core.get_image_features(pixels, host_grid, return_dict=True, **pre)
            else:
                out = core.get_image_features(pixels, grid, return_dict=True)
        return torch.cat(out.pooler_output)

    result = {"kind": "vision", "shape": shape, "images": n_images, "env": environment(), "rows": []}
    first = None
    for name in rows:
        if name == "batched-windows":
            vision_speed.patch_vision_attention(model)
        elif name == "padded":
            vision_speed.pad_vision_mlp(model)
        elif name == "padded-host-inputs":
            host_inputs = True
        elif name == "padded-compiled":
            vision_speed.compile_vision_blocks(model)
        _sync()
        t0 = time.perf_counter()
        feats = features()
        _sync()
        first_call = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(reps):
            features()
        _sync()
        seconds = (time.perf_counter() - t0) / reps
        first = feats if first is None else first
        result["rows"].append(
            {
                "path": name,
                "images_per_s": n_images / seconds,
                "first_call_s": first_call,
                "max_abs_diff_vs_eager": float((feats.float() - first.float()).abs().max()),
                "max_abs_feature": float(first.float().abs().max()),
            }
        )
    return result
