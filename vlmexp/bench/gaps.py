"""Where a profiled GPU stream sits idle, and which host code it waits for.

`bench/profile.py` tables sum kernel time by operator; they say how busy the GPU is (run V: 72% of an
eager training step) but not what the other 28% waits for. Here the kernels of a trace are merged into
busy intervals, and each idle gap is charged to the host code running at its midpoint: the innermost
CPU event on any thread (the autograd thread during a backward, the main thread elsewhere), named by
that op and the nearest frames of our own code and the libraries that call torch (vlmexp, trl,
transformers, peft). Host syncs (`.item()`, `.tolist()`, `nonzero`, stream syncs) are counted by the
same signature: each one drains the GPU's queue, and the host's next launches start from empty.
Needs a profile taken with `with_stack=True` (python frames as events). That tracing slows the host:
compare the kernel time with the unprofiled wall time before blaming the host. In run AB the eager
step's gaps were mostly "(no host event)", the profiler's own time: unprofiled, its kernels filled 91%
of the step.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from torch.autograd import DeviceType

# Host calls that wait for the GPU: each drains the queue (e.g. `.item()` is _local_scalar_dense).
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::is_nonzero",
    "aten::equal",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)
OURS = ("vlmexp/", "trl/", "transformers/", "peft/", "accelerate/")
MIN_GAP_US = 50.0  # shorter gaps are launch latency between back-to-back kernels, not waiting


def _signature(event, frames: int = 3) -> str:
    """'aten::item <- vlmexp/engine/train.py(324): compute_loss <- trl/...': the op and the nearest
    frames of our code and torch's callers, innermost first. Frames come from the python events the
    op nests in or, where a torch build records them as the op's `stack` instead (the H200's torch 2.11
    named no callers in run AB), from the nearest stack on the op or its parents."""
    parts, node, stack = [event.name[:60]], event.cpu_parent, getattr(event, "stack", None)
    while node is not None and len(parts) <= frames:
        if any(tag in node.name for tag in OURS):
            parts.append(short_frame(node.name))
        stack = stack or getattr(node, "stack", None)
        node = node.cpu_parent
    if len(parts) == 1 and stack:  # innermost frame first, as torch lists them
        parts += [short_frame(f) for f in stack if any(tag in f for tag in OURS)][:frames]
    return " <- ".join(parts)


def short_frame(frame: str) -> str:
    """'/usr/lib/python3/site-packages/trl/trainer/sft_trainer.py(1560): compute_loss' ->
    'trl/trainer/sft_trainer.py(1560): compute_loss'; also for a --target folder like /tmp/site."""
    for tag in OURS:
        at = frame.find(tag)
        if at >= 0:
            return frame[at:][:90]
    return frame[:90]


def gap_report(events, top: int = 15) -> str:
    """A text table: GPU idle time by the host code running during it, and host syncs by caller."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    )
    if not kernels:
        return "no CUDA kernels in the profile\n"
    busy: list[list[float]] = [list(kernels[0])]
    for start, end in kernels[1:]:
        if start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:], strict=False) if b[0] - a[1] >= MIN_GAP_US]
    span = busy[-1][1] - busy[0][0]
    idle = sum(b - a for a, b in gaps)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    starts = np.array([e.time_range.start for e in cpu])
    ends = np.array([e.time_range.end for e in cpu])
    by_sig: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for a, b in gaps:
        mid = (a + b) / 2
        inside = np.nonzero((starts <= mid) & (ends >= mid))[0]
        sig = "(no host event)" if len(inside) == 0 else _signature(cpu[inside[np.argmax(starts[inside])]])
        by_sig[sig][0] += b - a
        by_sig[sig][1] += 1
    lines = [
        f"GPU idle {idle / 1e3:.1f} ms of {span / 1e3:.1f} ms between the first and last kernel "
        f"({100 * idle / max(span, 1e-9):.0f}%), {len(gaps)} gaps >= {MIN_GAP_US:.0f} us; by the host code "
        "running at each gap's midpoint:",
    ]
    for sig, (us, n) in sorted(by_sig.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {us / 1e3:8.1f} ms {n:5d} gaps  {sig}")
    syncs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in cpu:
        if e.name in SYNC_OPS:
            sig = _signature(e, frames=4)
            syncs[sig][0] += e.time_range.end - e.time_range.start
            syncs[sig][1] += 1
    lines.append(f"host syncs ({sum(n for _, n in syncs.values())}), by caller:")
    for sig, (us, n) in sorted(syncs.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"  {n:5d} x {us / 1e3:8.1f} ms  {sig}")
    return "\n".join(lines) + "\n"
