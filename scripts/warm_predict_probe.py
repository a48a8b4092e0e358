"""Probe: where a cached ("warm") prediction batch's GPU time goes beyond the GEMMs (issue 12).

On the GPU machine, with the random-weight Qwen2.5-VL-3B shape, the bench's 448 px samples and prompt
(`bench.synth`, 570 tokens, 25 labels) and the run's levers: `engine.predict.predict` over N images with
the run caches filled by one untimed call first, as every fold after the first finds them. Then:
- wall seconds of 3 more calls (images/s, synchronised at the ends only);
- one profiled call (CUDA kernels and CPU ops with shapes and python stacks): the kernel time by
  operator, and the memory-bound operators (copy, cat, mul, add, ...) grouped by their 6 innermost
  python frames, so each one is charged to the code that launched it;
- the host syncs of one call, by site (`VLMEXP_SYNC_DEBUG`'s `SyncSites`);
- one call profiled on the GPU side only (no host tracing to slow the host): the GPU's idle time between
  its first and last kernel, split into short gaps (kernels queued back to back) and long ones, and the
  longest gaps with the kernels on either side.
Prints the tables. `python3 scripts/warm_predict_probe.py [N]` (default 128).
"""

from __future__ import annotations

import sys
import time

import torch

from vlmexp.bench.profile import SyncSites
from vlmexp.bench.shapes import build_model, build_processor, get_shape
from vlmexp.bench.synth import labels, make_samples
from vlmexp.config import Config
from vlmexp.engine.predict import predict
from vlmexp.engine.run_caches import RunCaches

WATCH = (
    "aten::copy_",
    "aten::cat",
    "aten::mul",
    "aten::add",
    "aten::index",
    "aten::masked_scatter",
    "aten::clone",
    "aten::fill_",
    "aten::zero_",
    "aten::where",
    "aten::index_select",
    "aten::gather",
)


def main(n: int = 128) -> None:
    sh = get_shape("qwen2.5-vl-3b")
    model = build_model(sh, "cuda", torch.bfloat16).eval().requires_grad_(False)
    processor = build_processor(sh, 448)
    samples = make_samples(processor, n, 448, 570, n_labels=25)
    names = labels(25)
    cfg = Config()
    cfg.predict.mode = "score"
    caches = RunCaches.for_run(cfg, processor)
    caches.vision_trains = False

    def call():
        return predict(cfg, model, processor, samples, names, progress=False, caches=caches)

    call()  # fills the caches
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    print(f"warm: {3 * n / (time.perf_counter() - t0):.1f} images/s over 3 calls of {n}", flush=True)
    with SyncSites() as syncs:
        call()
        torch.cuda.synchronize()
    print(syncs.report(10), flush=True)
    gpu_gaps(call, n)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    print(f"kernels {kernel / 1e3:.1f} ms for {n} images: {kernel / 1e3 / n:.3f} ms an image", flush=True)
    print(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70), flush=True)
    by_stack = prof.key_averages(group_by_stack_n=6)
    rows = [e for e in by_stack if e.key in WATCH and e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    for e in rows[:40]:
        share = 100 * e.device_time_total / kernel
        print(f"\n{e.key}: {e.device_time_total / 1e3:.2f} ms ({share:.2f}%), {e.count} calls")
        for frame in e.stack[:6]:
            print(f"    {frame}")
    by_shape = prof.key_averages(group_by_input_shape=True)
    rows = [e for e in by_shape if e.key in WATCH and e.device_time_total > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    print("\nby input shape:")
    for e in rows[:30]:
        print(f"{e.key:24s} {e.device_time_total / 1e3:8.2f} ms {e.count:5d} calls  {e.input_shapes}")


def gpu_gaps(call, n: int) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start
    )
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    gaps = []
    for a, b in zip(kernels, kernels[1:], strict=False):
        gap = b.time_range.start - max(a.time_range.end, 0)
        if gap > 0:
            gaps.append((gap, a.name, b.name))
    buckets = {"<20 us": (0, 20), "20-200 us": (20, 200), ">=200 us": (200, float("inf"))}
    idle = {k: [g for g, *_ in gaps if lo <= g < hi] for k, (lo, hi) in buckets.items()}
    print(
        f"gpu-only profile: {n} images in {wall * 1e3:.1f} ms wall, {len(kernels)} kernels, "
        f"busy {busy / 1e3:.1f} ms, first-to-last {span / 1e3:.1f} ms; idle in gaps "
        + ", ".join(f"{k} {sum(v) / 1e3:.1f} ms ({len(v)})" for k, v in idle.items()),
        flush=True,
    )
    for g, before, after in sorted(gaps, reverse=True)[:20]:
        print(f"  {g:8.0f} us  after {before[:60]}  before {after[:60]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
