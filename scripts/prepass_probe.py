"""Probe: is the vision pre-pass of new images bound by its pixel workers or by the tower? (issue 12)

On the GPU machine, with the random-weight Qwen2.5-VL-3B shape and the run's levers (`speed.prepare`),
over N random 448 px images:
- pixels: `image_inputs` + the pinned bf16 copy for 32 images, on the main thread alone, and split over
  1, 2, 4 and 8 worker threads as `encode_images` splits a batch;
- tower: one `VisionFeatureCache.features` call on 32 images' pixels already on the GPU (synchronised);
- the whole `encode_images` over the N images with 1, 2, 4 and 8 workers (fresh caches each), with the
  seconds its main thread waited for pixels ("encode") and spent queueing the tower ("vision_tower").
Prints one JSON line per measurement. `python3 scripts/prepass_probe.py [N]`.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vlmexp import timing
from vlmexp.bench.shapes import build_model, build_processor, get_shape
from vlmexp.config import Config
from vlmexp.engine import speed
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.vision_cache import VisionFeatureCache
from vlmexp.engine.vision_prepass import _by_grid, encode_images, image_inputs


def say(**row) -> None:
    print(json.dumps(row), flush=True)


def median_seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(n: int = 192) -> None:
    sh = get_shape("qwen2.5-vl-3b")
    model = build_model(sh, "cuda", torch.bfloat16).eval().requires_grad_(False)
    processor = build_processor(sh, 448)
    say(levers=speed.prepare(model, Config()))
    rng = np.random.default_rng(0)

    def new_images(k: int, seed: int) -> list[Image.Image]:
        r = np.random.default_rng(seed)
        return [Image.fromarray(r.integers(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(k)]

    images = new_images(32, int(rng.integers(1 << 30)))
    keys = [str(i) for i in range(32)]

    def pixels(part: list[int]):
        inputs = image_inputs(processor, [images[i] for i in part])
        return _by_grid([keys[i] for i in part], inputs, torch.bfloat16, True)

    say(what="pixels, main thread", images=32, ms=1e3 * median_seconds(lambda: pixels(list(range(32)))))
    for workers in (1, 2, 4, 8):
        with ThreadPoolExecutor(workers) as pool:
            size = -(-32 // workers)
            parts = [list(range(i, min(32, i + size))) for i in range(0, 32, size)]
            ms = 1e3 * median_seconds(
                lambda parts=parts, pool=pool: [f.result() for f in [pool.submit(pixels, p) for p in parts]]
            )
        say(what="pixels, split over workers", workers=workers, images=32, ms=ms)

    inputs = image_inputs(processor, images)
    # The image processor's own ops on the GPU (its `device` keyword): uint8 pixels copied, not bf16 patches
    on_gpu = processor.image_processor(images, return_tensors="pt", device="cuda")
    cpu_bf16 = inputs["pixel_values"].to(torch.bfloat16)
    same = torch.equal(on_gpu["pixel_values"].to(torch.bfloat16).cpu(), cpu_bf16)
    ms = 1e3 * median_seconds(lambda: processor.image_processor(images, return_tensors="pt", device="cuda"))
    say(what="pixels on the GPU (image processor device=cuda)", images=32, ms=ms, bf16_equal_to_cpu=same)
    pix = inputs["pixel_values"].to("cuda", torch.bfloat16)
    grid = inputs["image_grid_thw"]

    def tower():
        cache = VisionFeatureCache()
        cache.features(model, keys, grid, pix, range(32))

    with speed.attention_backends(Config()):
        say(what="tower, 32 images", ms=1e3 * median_seconds(tower))
        for workers in (1, 2, 4, 8):
            caches = RunCaches.for_run(Config(), processor)
            caches.vision_trains = False
            caches.bind(model)
            batch = new_images(n, 100 + workers)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with timing.recording(sync=False) as timer:
                encode_images(
                    model,
                    processor,
                    batch,
                    caches.vision,
                    encoder=caches.encoder,
                    progress=False,
                    workers=workers,
                )
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            say(
                what="encode_images",
                workers=workers,
                images=n,
                seconds=seconds,
                images_per_s=n / seconds,
                phases=timer.report()["phases"],
            )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 192)
