"""A checkpoint's optimizer state written in a background thread while training goes on.

Each epoch's checkpoint holds the AdamW state of the LoRA weights (two fp32 moments per weight: 220 MB
for the 3B's language LoRA at r=16). transformers writes it with `torch.save` on the main thread, and
the GPU waits for the next step meanwhile: in a 3B demo run's profile (run AD, docs/performance.md)
the optimizer's `torch.save` and its copy to the CPU were most of the checkpoint phase (2.5 s a run).

Here the state is copied to the CPU on the main thread (the next optimizer step changes it in place),
and the thread serialises it to `optimizer.pt.tmp` and renames it to `optimizer.pt`. The `.tmp` file
is created before the trainer writes the checkpoint's `trainer_state.json` (its mark of a complete
checkpoint), so a kill while writing leaves a `.tmp` behind and `train.last_checkpoint` removes that
checkpoint: the fold resumes from the one before, as after a kill mid-save before. The file's content
is what `torch.save(optimizer.state_dict())` writes, with the tensors on the CPU (transformers loads it
with map_location="cpu" either way). A failed write is raised at the next `wait()`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

PENDING_SUFFIX = ".tmp"  # a checkpoint holding a file with this suffix was not finished


def cpu_copy(state):
    """`state` (nested dicts/lists of tensors) with every tensor copied to the CPU: queued without
    blocking, then one sync, instead of a sync per tensor (1,000 of them for the 3B's LoRA)."""
    on_cuda = []

    def copy(x):
        if isinstance(x, torch.Tensor):
            if x.is_cuda:
                on_cuda.append(x)
                return x.detach().to("cpu", non_blocking=True)
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(state)
    if on_cuda:
        torch.cuda.synchronize()
    return out


class BackgroundWriter:
    """One file write at a time, in a daemon thread; `wait()` before anything reads or moves the files."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state, path: str | os.PathLike) -> None:
        """Write `state` (already on the CPU) to `path` after the previous write is done."""
        self.wait()
        path = Path(path)
        pending = path.with_name(path.name + PENDING_SUFFIX)
        pending.touch()  # before the checkpoint's trainer_state.json: an unfinished write stays visible

        def write():
            try:
                torch.save(state, pending)
                os.replace(pending, path)
            except BaseException as e:  # re-raised on the main thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write, name="vlmexp-checkpoint", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """Whether a write was started and not waited for."""
        return self._thread is not None

    def wait(self) -> None:
        """Block until the last write is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint's optimizer state failed: {error}") from error
