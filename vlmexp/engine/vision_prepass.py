"""Every image of a fold through the frozen vision tower once, in batches of equal-size images, before
training starts (`speed.vision_prepass`).

Without it the feature cache (`vision_cache.VisionFeatureCache`) fills lazily: a few images of mixed
sizes inside each training and prediction batch. On an H200 that first pass of a whole run went at ~36
images/s while the tower alone ran 170 images/s batched and 307 compiled with static shapes (issue 12,
docs/performance.md); the compiled blocks (`speed.vision_compile`) need a call of equal-size images,
which a mixed batch never is. Here the images are grouped by their patch grid (t, h, w), up to
`max_images` per tower call, and the cache is filled through `VisionFeatureCache.features`, the code path
training and prediction use, so they then find every image cached and compute the same features.
With `speed.vision_compile` each (grid, image-count bucket) pair compiles once: worth it for images of
one size (`image.resize=448`), costly on mixed sizes (the demo's 20 grids would be ~40 compilations).

Pixels are computed as the processor computes them inside a row (its own keyword merge, then its image
processor, as transformers' `ProcessorMixin.__call__` does); tests/test_vision_prepass.py checks them
against `Encoder.train_row` and `prompt_row`. They go through the run Encoder's `PixelMemo`, so those
rows then take each image's grid from it instead of computing the image again. A batch's pixels are
built by worker threads (`pixel_workers`, each a part of the batch) while the main thread runs the
tower on the previous batch (each tower call ends in a sync, so building them in between left the GPU
idle for the image processor's time), and handed over in the tower's dtype in page-locked memory for
an asynchronous copy. Prediction runs the same pass over its images first (`predict.predict`), so new
test images, too, go through the tower by size instead of inside mixed scoring batches.

Only where the cache serves the model (`RunCaches.vision_for`: a frozen Qwen-VL-style tower, Qwen2/2.5/3-VL
and Qwen3.5). Gemma 3's cached features are computed by its first batches instead (one fixed-size crop per
image: nothing to group); Gemma 4, LLaVA and SmolVLM run their tower inside forward and get nothing here.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch
from PIL import Image
from rich.progress import Progress

from vlmexp.engine import speed
from vlmexp.engine.encode import Encoder, image_key
from vlmexp.engine.pixel_memo import PixelMemo
from vlmexp.engine.vision_cache import VisionFeatureCache, is_gemma3
from vlmexp.engine.vision_speed import vision_tower
from vlmexp.timing import phase

log = logging.getLogger(__name__)


def fold_images(cfg, train: list[dict], val: list[dict], test: list[dict]) -> list[Image.Image]:
    """The images the fold's local model meets: training rows, validation rows (per-epoch validation or
    OOF prediction) and the test set. An OpenAI-compatible backend (predict.backend=openai) predicts on
    its server, so validation counts only with train.eval and the test set not at all."""
    local = cfg.predict.backend == "local"
    groups = [train, val if local or cfg.train.eval else [], test if local else []]
    return [img for samples in groups for s in samples for img in s["images"]]


def prepass_fold(exp, model: torch.nn.Module, train: list[dict], val: list[dict], run_progress=None) -> dict:
    """`prepass` over the fold's images (`fold_images`, with `exp.test_samples`) for the fold's training
    model: the first fold computes every image; later folds find them cached.
    `exp`: recipe.Experiment; `run_progress`: the run's RunProgress, whose live display gets the bar."""
    images = fold_images(exp.cfg, train, val, exp.test_samples)
    bar = run_progress.progress if run_progress is not None else False
    return prepass(exp.cfg, exp.caches, model, exp.processor, images, training=True, progress=bar)


def prepass(
    cfg,
    caches,
    model: torch.nn.Module,
    processor,
    images: list[Image.Image],
    *,
    training: bool,
    progress=False,
) -> dict:
    """`encode_images` over `images` when `speed.vision_prepass` is on and the run's feature cache
    (`caches`: run_caches.RunCaches) serves `model`; {} otherwise. `training`: a training model, which tells
    whether its tower trains (`RunCaches.vision_for`); prediction (`predict.predict`) passes False and
    gets the pass only where training found the tower frozen. Images already cached cost a key lookup."""
    if not cfg.speed.vision_prepass or caches is None or cfg.model.head != "lm":
        return {}  # model.head=cls trains and predicts without the feature cache
    if cfg.train.gpus_per_fold > 1:
        return {}  # a sharded fold: every rank would run the whole pass; its batches do it lazily
    cache = caches.vision_for(model, training=training)
    if cache is None or is_gemma3(model):
        return {}  # Gemma 3: one fixed-size crop per image, features computed lazily by the first batch
    caches.bind(model)
    # The tower levers (window attention, MLP padding, compiled blocks) before its first call; recorded
    # on the base, so the trainer's own `prepare` changes nothing afterwards.
    speed.prepare(model, cfg)
    with speed.attention_backends(cfg):
        return encode_images(model, processor, images, cache, encoder=caches.encoder, progress=progress)


def encode_images(
    model: torch.nn.Module,
    processor,
    images: Iterable[Image.Image],
    cache: VisionFeatureCache,
    *,
    max_images: int = 32,
    progress: bool | Progress = True,
    encoder: Encoder | None = None,
    workers: int | None = None,
) -> dict:
    """Cache the features of every image of `images` not cached yet (duplicates once), in tower calls
    of equal-size images. `progress`: True draws its own bar, a rich Progress (e.g. the run's) gets a
    task, False none. `encoder`: the run's Encoder, whose key memo is used and whose kept pixels of the
    cached images are let go. `workers`: threads building the pixels (default `pixel_workers()`).
    Returns {"images": computed, "calls": tower calls, "sizes": distinct grids,
    "budget_full": whether the cache's byte budget (speed.vision_cache_gib) stopped the pass}."""
    key_of = encoder.key if encoder is not None else image_key
    memo = encoder.memo if encoder is not None else None
    workers = workers or pixel_workers()
    images = list(images)
    todo: dict[str, Image.Image] = {}
    for img, k in zip(images, _keys(key_of, images, workers), strict=True):
        if k not in cache and k not in todo:
            todo[k] = img
    groups: dict[tuple, list[str]] = defaultdict(list)
    for k, img in todo.items():
        groups[grid_guess(processor.image_processor, img)].append(k)
    counts = {"images": 0, "calls": 0, "sizes": 0, "budget_full": False}
    if not todo:
        return counts
    visual = vision_tower(model)
    param = next(visual.parameters())
    grids: set[tuple[int, ...]] = set()
    own = progress is True
    bar = Progress(transient=True) if own else (progress or None)
    batches = [g[i : i + max_images] for g in groups.values() for i in range(0, len(g), max_images)]
    pin = param.device.type == "cuda"

    def pixels_of(keys: list[str]) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        # Runs in a worker thread while the GPU runs the tower on the previous batch. No `phase()`
        # here: the timer's phase stack belongs to the main thread, which charges its wait to "encode".
        inputs = image_inputs(processor, [todo[k] for k in keys], memo=memo)
        return _by_grid(keys, inputs, param.dtype, pin)

    def submit(keys: list[str]) -> list[Future]:
        # A batch's images split among the workers: each image's pixels depend on that image alone.
        size = -(-len(keys) // workers)
        return [pool.submit(pixels_of, keys[i : i + size]) for i in range(0, len(keys), size)]

    with (
        phase("vision_tower"),
        bar if own else nullcontext(),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmexp-pixels") as pool,
    ):
        task = bar.add_task("vision pre-pass", total=len(todo)) if bar else None
        pending = submit(batches[0])
        for j, keys in enumerate(batches):
            if cache.bytes_left <= 0:
                counts["budget_full"] = True
                break
            with phase("encode"):
                parts = [part for f in pending for part in f.result()]
            # The next batch's pixels are computed on the CPU while this one's tower calls run.
            pending = submit(batches[j + 1]) if j + 1 < len(batches) else []
            for sub, grid, pix in _merged(parts, param.device, pin):
                cache.features(model, sub, grid, pix, range(len(sub)))  # grid on the CPU: vision_inputs
                grids.add(tuple(grid[0].tolist()))
                counts["calls"] += 1
                counts["images"] += len(sub)
                if encoder is not None:
                    encoder.forget_pixels(k for k in sub if k in cache)
                if any(k not in cache for k in sub):
                    counts["budget_full"] = True
                    break
            if bar:
                bar.advance(task, len(keys))
            if counts["budget_full"]:
                break
        for f in pending:  # a pass stopped by the budget: the next batch's pixels are not needed
            f.cancel()
        if bar and not own:
            bar.remove_task(task)
    counts["sizes"] = len(grids)
    if counts["budget_full"]:
        log.info(
            "vision pre-pass stopped after %d of %d images: the feature cache is full "
            "(speed.vision_cache_gib=%.3g); the rest are computed in their batches",
            counts["images"],
            len(todo),
            cache.max_bytes / 2**30,
        )
    n, calls = counts["images"], counts["calls"]
    log.info("vision pre-pass: %d images in %d tower calls, %d sizes", n, calls, len(grids))
    return counts


def pixel_workers() -> int:
    """Threads building pre-pass pixels: a quarter of the CPU cores, 1 to 4 (16 cores: 4; CI's 2: 1).
    The Qwen image processor's patchify and concatenation are memory-bound tensor copies that release
    the GIL; one thread of them kept up with neither the tower nor prediction on an H200 (run AL)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _keys(key_of, images: list[Image.Image], workers: int) -> list[str]:
    """Each image's content key, hashed by `workers` threads: a 448 px image is 0.6 MB to copy and hash
    (~1-2 ms, run AL's profile: 0.36 s before the first tower call of 224 new images), and hashlib
    lets go of the GIL while it hashes."""
    if workers < 2 or len(images) < 2:
        return [key_of(img) for img in images]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlmexp-keys") as pool:
        return list(pool.map(key_of, images))


def _by_grid(
    keys: list[str], inputs: dict, dtype: torch.dtype, pin: bool
) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, image_grid_thw, pixel_values) per patch grid of one processor call: normally one, but a
    guessed group whose real grids differ (a processor setting the guess does not know) is split, so
    every tower call still sees one image size. Pixels come in the tower's `dtype` (which it casts them
    to first anyway: bf16 halves the bytes to copy, 154 -> 77 MB for 32 images of 448 px), and with
    `pin` in page-locked memory, so their copy to the GPU runs without blocking the host (run AB:
    pageable copies left the GPU idle); both in one copy."""
    grid, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
    chunks = pixels.split(grid.prod(-1).tolist())
    by_grid: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(grid.tolist()):
        by_grid[tuple(g)].append(i)
    out = []
    for idx in by_grid.values():
        pix = torch.empty((sum(len(chunks[i]) for i in idx), pixels.shape[1]), dtype=dtype, pin_memory=pin)
        at = 0
        for i in idx:  # each image's rows cast as they are copied in
            pix[at : at + len(chunks[i])].copy_(chunks[i])
            at += len(chunks[i])
        out.append(([keys[i] for i in idx], grid[idx], pix))
    return out


def _merged(
    parts: list, device: torch.device, pin: bool
) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """One (keys, grid, pixels on `device`) per patch grid from the workers' parts of one batch: each
    part copied on its own (without blocking when pinned), then joined on the device."""
    by_grid: dict[tuple, list] = defaultdict(list)
    for part in parts:
        by_grid[tuple(part[1][0].tolist())].append(part)
    out = []
    for group in by_grid.values():
        keys = [k for sub, _, _ in group for k in sub]
        pix = [p.to(device, non_blocking=pin) for _, _, p in group]
        out.append((keys, torch.cat([g for _, g, _ in group]), pix[0] if len(pix) == 1 else torch.cat(pix)))
    return out


def image_inputs(processor, images: list[Image.Image], memo: PixelMemo | None = None) -> dict:
    """pixel_values and image_grid_thw of `images`, as the processor computes them inside a row: its
    keyword merge (defaults, the tokenizer's init kwargs), then `image_processor(images, **images_kwargs)`
    (transformers 5 `ProcessorMixin.__call__`). Each image's patches follow from that image alone.
    `memo`: the run Encoder's `PixelMemo`, which computes them and remembers each image's grid, so the
    image's rows (same keywords) need not compute them again."""
    tokenizer_kwargs = processor.tokenizer.init_kwargs
    merged = processor._merge_kwargs(tokenizer_init_kwargs=tokenizer_kwargs, return_tensors="pt")
    if memo is not None:
        return memo.fresh(images, **merged["images_kwargs"])
    return processor.image_processor(images, **merged["images_kwargs"])


def grid_guess(image_processor, img: Image.Image) -> tuple:
    """The patch grid (h, w) the Qwen image processor will give `img`, from its size alone, to group
    images before computing any pixels: different sizes often share a grid (48x48 and 56x48 px, height
    x width, both give 4x4 patches in the tiny models; the demo's 600 images have 579 pixel sizes and 20
    grids at Qwen2.5-VL's settings). A processor without these settings groups by pixel size instead."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    size = dict(getattr(image_processor, "size", None) or {})  # a SizeDict in transformers 5
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if not (patch and merge and size.get("shortest_edge") and size.get("longest_edge")):
        return (img.height, img.width)
    h, w = smart_resize(img.height, img.width, patch * merge, size["shortest_edge"], size["longest_edge"])
    return (h // patch, w // patch)
