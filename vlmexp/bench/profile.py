"""Optional torch.profiler capture for bench rows: where a step's time goes, by kernel and operator.

Set `VLMEXP_PROFILE_DIR=/some/dir` and the train bench profiles 3 steps of each project row's second
(cached) pass, the predict bench 2 batches of each row; each writes `<dir>/<row>.txt`: wall time, the
summed CUDA kernel time over it (wall >> kernels means the GPU waits for the CPU), what the GPU's idle
gaps wait for (`bench/gaps.py`), and the top operators.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import TrainerCallback

from vlmexp.bench.gaps import gap_report


def enabled() -> bool:
    return bool(os.environ.get("VLMEXP_PROFILE_DIR"))


def _write(prof, name: str, wall_s: float, units: int, unit: str) -> None:
    out = Path(os.environ["VLMEXP_PROFILE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    # device-side events only (kernels, memcpy): an operator's row repeats its kernels' time
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    head = (
        f"{name}: {units} {unit} in {wall_s * 1e3:.1f} ms wall, CUDA kernels {kernel_us / 1e3:.1f} ms "
        f"({kernel_us / 1e4 / max(wall_s, 1e-9):.0f}% of wall)\n"
    )
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    cpu = events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    idle = gap_report(prof.events())
    (out / f"{slug}.txt").write_text(head + idle + "\n" + table + "\n\nby CPU time\n" + cpu)
    print(head, end="")


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps `start+1 .. start+n` of a Trainer run."""

    def __init__(self, name: str, start: int, n: int = 3, batch_size: int = 1):
        self.name, self.start, self.n, self.batch_size = name, start, n, batch_size
        self.prof = None
        self.t0 = self.t_enter = 0.0
        # Wall seconds from the profiler's start to its table written, the n profiled steps included:
        # a bench row leaves them out of its timed steps (run V's cached rate, 7.4 samples/s against
        # ~43, measured the profiler). None until the profile is written.
        self.seconds: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.t_enter = time.perf_counter()
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                with_stack=True,  # python frames as events: gap_report names the code the GPU waits for
            )
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and state.global_step == self.start + self.n:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            _write(self.prof, self.name, wall, self.n * self.batch_size, "samples")
            self.prof = None
            self.seconds = time.perf_counter() - self.t_enter


def unprofiled_rate(steps: int, batch_size: int, seconds: float, prof: StepProfiler | None) -> float:
    """Samples/s over a timed window of `steps` steps of `batch_size`, leaving out the steps a
    `StepProfiler` profiled inside it and the seconds it spent (profiling, writing its table)."""
    if prof is None or prof.seconds is None:
        return steps * batch_size / seconds
    return (steps - prof.n) * batch_size / (seconds - prof.seconds)


def profile_calls(name: str, fn, items: list, unit: str = "images", per_item: int = 1) -> None:
    """Profile `fn(item)` over `items` (already warmed up)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        with_stack=True,
    ) as prof:
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    _write(prof, name, wall, len(items) * per_item, unit)
