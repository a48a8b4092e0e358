"""Optional torch.profiler capture for bench rows: where a step's time goes, by kernel and operator.

Set `VLMEXP_PROFILE_DIR=/some/dir` and the train bench profiles 3 steps of each project row's second
(cached) pass, the predict bench 2 batches of each row; each writes `<dir>/<row>.txt`: wall time, the
summed CUDA kernel time over it (wall >> kernels means the GPU waits for the CPU), what the GPU's idle
gaps wait for (`bench/gaps.py`), and the top operators.

`VLMEXP_PROFILE_MODE=cuda` records the GPU's activity only: no CPU events, no python frames, so the
host runs as unprofiled (run AB: python tracing alone left the GPU idle in 7 ms gaps) and kernels /
wall is the GPU's true busy share. `VLMEXP_SYNC_DEBUG=1` also lists, for the profiled steps, every
host sync (`torch.cuda.set_sync_debug_mode`) by the nearest frames of our code and the libraries:
each one drains the GPU's queue.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import TrainerCallback

from vlmexp.bench.gaps import OURS, gap_report, short_frame


def enabled() -> bool:
    return bool(os.environ.get("VLMEXP_PROFILE_DIR"))


def _profiler():
    cuda_only = os.environ.get("VLMEXP_PROFILE_MODE") == "cuda"
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if not cuda_only:
        activities.insert(0, torch.profiler.ProfilerActivity.CPU)
    # with_stack: python frames as events, so gap_report names the code the GPU waits for
    return torch.profiler.profile(activities=activities, with_stack=not cuda_only)


class SyncSites:
    """Counts host syncs by call site while entered: torch warns at each synchronizing CUDA call in
    sync debug mode "warn"; the warning is caught and charged to the innermost frames of our code
    and the libraries (e.g. "trl/trainer/sft_trainer.py(1643): compute_loss"), as gap_report names them."""

    def __init__(self):
        self.sites: Counter[str] = Counter()

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # before the hook: a warning it gives is not a sync
        self._show, warnings.showwarning = warnings.showwarning, self._record
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(o in f.filename for o in OURS)]
        site = " <- ".join(short_frame(f"{f.filename}({f.lineno}): {f.name}") for f in frames[-1:-3:-1])
        self.sites[site or f"{filename}:{lineno}"] += 1

    def report(self, steps: int) -> str:
        total = sum(self.sites.values())
        lines = [f"host syncs: {total} in {steps} steps ({total / max(steps, 1):.1f} a step), by site:"]
        lines += [f"  {n:5d}  {site}" for site, n in self.sites.most_common(25)]
        return "\n".join(lines) + "\n"


def _write(prof, name: str, wall_s: float, units: int, unit: str, extra: str = "") -> None:
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
    (out / f"{slug}.txt").write_text(head + extra + idle + "\n" + table + "\n\nby CPU time\n" + cpu)
    print(head, end="")


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps `start+1 .. start+n` of a Trainer run."""

    def __init__(self, name: str, start: int, n: int = 3, batch_size: int = 1):
        self.name, self.start, self.n, self.batch_size = name, start, n, batch_size
        self.prof = None
        self.syncs: SyncSites | None = None
        self.t0 = self.t_enter = 0.0
        # Wall seconds from the profiler's start to its table written, the n profiled steps included:
        # a bench row leaves them out of its timed steps (run V's cached rate, 7.4 samples/s against
        # ~43, measured the profiler). None until the profile is written.
        self.seconds: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            self.t_enter = time.perf_counter()
            torch.cuda.synchronize()
            self.prof = _profiler()
            self.syncs = SyncSites() if os.environ.get("VLMEXP_SYNC_DEBUG") else None
            if self.syncs:
                self.syncs.__enter__()
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and state.global_step == self.start + self.n:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            extra = ""
            if self.syncs:
                self.syncs.__exit__(None, None, None)
                extra = self.syncs.report(self.n)
            _write(self.prof, self.name, wall, self.n * self.batch_size, "samples", extra)
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
    syncs = SyncSites() if os.environ.get("VLMEXP_SYNC_DEBUG") else None
    with _profiler() as prof, syncs or contextlib.nullcontext():
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    extra = syncs.report(len(items)) if syncs else ""
    _write(prof, name, wall, len(items) * per_item, unit, extra)
