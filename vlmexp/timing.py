"""A run's wall time split into named phases: `with phase("train_steps"): trainer.train()`.

The recipe and the engine mark their phases (model loading, encoding, the vision tower's first pass,
training steps, validation, OOF and test prediction, finalize); torch.compile's own compilations are
caught through dynamo's callbacks as the phase "compile". Times are exclusive: a phase nested in
another (validation inside training steps, encoding inside validation, compile inside anything)
counts only in the innermost one, so the phases of a run add up to at most its wall time and what
no phase claims is reported as "other".

Nothing is recorded unless a `PhaseTimer` is active (`with recording() as timer:`, e.g. in
`exp bench run`): in a plain run `phase()` costs one global lookup.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# The phases the recipe and engine mark, in run order (a report lists these first).
PHASES = (
    "prepare",  # data checks, folds, prompts, processor, test samples
    "load_model",  # base weights (+ LoRA / adapter) from disk to the device
    "encode",  # rows through the processor, first time each (later epochs and folds reuse them)
    "vision_tower",  # a frozen tower's first pass over new images (features cached afterwards)
    "compile",  # torch.compile (dynamo + inductor), wherever it happens
    "train_steps",  # trainer.train() minus everything nested in it
    "validation",  # per-epoch validation predictions (EvalCallback)
    "checkpoint",  # trainer checkpoints written for resume (weights, optimizer, RNG), the best loaded back
    "save",  # adapter and processor written to the fold folder
    "predict_oof",  # the held-out fold's predictions
    "predict_test",  # the test set's predictions
    "finalize",  # CV, voting, submission, leaderboard row
)


# CPU-only phases entered once per row: no GPU wait at their boundaries, which would stop the CPU from
# encoding the next batch while the GPU runs the last step (the kernels then count in the enclosing
# phase, e.g. train_steps, at its next wait).
NO_SYNC = frozenset({"encode"})


class PhaseTimer:
    """Exclusive wall seconds per phase. `sync`: wait for the GPU at phase boundaries (except NO_SYNC),
    so the work a phase queued is charged to it and not to the phase that happens to wait for it (on
    CUDA kernels run asynchronously; without it a training step's kernels can land in "save")."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, seconds of nested phases]
        self._lock = threading.Lock()  # compile callbacks can fire from autograd's backward thread
        self.started = time.perf_counter()
        self.stopped: float | None = None
        # Python's cyclic GC, which runs inside whatever phase allocates: seconds and full (gen 2) passes
        self.gc_seconds, self.gc_full, self._gc_started = 0.0, 0, 0.0

    def enter(self, name: str) -> None:
        self._wait(name)
        with self._lock:
            self._stack.append([name, time.perf_counter(), 0.0])

    def exit(self, name: str) -> None:
        self._wait(name)
        with self._lock:
            if not self._stack or self._stack[-1][0] != name:
                return  # an unbalanced exit (e.g. a compile that raised before its start callback)
            _, start, nested = self._stack.pop()
            total = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + total - nested
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][2] += total

    def _wait(self, name: str) -> None:
        if self.sync and name not in NO_SYNC:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    def on_gc(self, stage: str, info: dict) -> None:
        """A `gc.callbacks` hook: time every collection while recording."""
        if stage == "start":
            self._gc_started = time.perf_counter()
            return
        self.gc_seconds += time.perf_counter() - self._gc_started
        self.gc_full += info.get("generation") == 2

    @property
    def wall(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started

    def report(self) -> dict:
        """{"wall_s", "phases": {name: seconds} in run order, "other_s", "calls"}, e.g.
        {"wall_s": 61.2, "phases": {"load_model": 8.1, "train_steps": 30.4, ...}, "other_s": 2.0}."""
        order = [p for p in PHASES if p in self.seconds] + sorted(set(self.seconds) - set(PHASES))
        phases = {p: round(self.seconds[p], 3) for p in order}
        wall = self.wall
        return {
            "wall_s": round(wall, 3),
            "phases": phases,
            "other_s": round(wall - sum(self.seconds.values()), 3),
            "calls": {p: self.calls[p] for p in order},
            # inside the phases above, not beside them, e.g. {"seconds": 3.6, "full_collections": 19}
            "gc": {"seconds": round(self.gc_seconds, 3), "full_collections": self.gc_full},
        }


_ACTIVE: PhaseTimer | None = None


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block's wall time (less nested phases) to `name` when a timer records."""
    timer = _ACTIVE
    if timer is None:
        yield
        return
    timer.enter(name)
    try:
        yield
    finally:
        timer.exit(name)


@contextmanager
def recording(sync: bool | None = None) -> Iterator[PhaseTimer]:
    """Record phases (and torch.compile's compilations) until the block ends. `sync` defaults to
    True on CUDA. One recording at a time: a second one nested inside fails loud."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("timing.recording() is already active; nest phase() calls instead")
    if sync is None:
        import torch

        sync = torch.cuda.is_available()
    timer = PhaseTimer(sync=sync)
    hooks = _compile_hooks(timer)
    gc.callbacks.append(timer.on_gc)
    _ACTIVE = timer
    try:
        yield timer
    finally:
        _ACTIVE = None
        timer.stopped = time.perf_counter()
        gc.callbacks.remove(timer.on_gc)
        if hooks:
            from torch._dynamo.callback import callback_handler

            callback_handler.remove_start_callback(hooks[0])
            callback_handler.remove_end_callback(hooks[1])


def _compile_hooks(timer: PhaseTimer) -> tuple | None:
    """Dynamo's compile start/end callbacks as the phase "compile" (they fire once per outermost
    compilation, including the backward graph compiled lazily in the first backward)."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # pragma: no cover - torch without dynamo
        return None

    def start(_args=None):
        timer.enter("compile")

    def end(_args=None):
        timer.exit("compile")

    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)
    return start, end
