"""Launchers schedule units of work; they never import the recipe or know what a fold does.

The unit is one fold of one run, `recipe.run_fold_task(cfg, k)`: any process that can see the run
folder (and the data) can run it, and a rerun of a half-done fold resumes it. The recipe picks a launcher:

- in-process (`launcher=local gpus=1`, the default): the recipe's own loop, one fold after another;
- `launch.torchrun` (`launcher=local gpus=N`): one process per GPU of this machine, each running the
  units k with k % N == rank; its processes live for the whole run, so the run's caches (encoded rows,
  frozen-tower features) carry over between the folds a process trains;
- `launch.ray_tasks` (`launcher=ray`): every unfinished fold of every run is a Ray task asking for
  `train.gpus_per_fold` GPUs, so K folds x N variants fill a cluster; each run is finalised in the
  driver as soon as its folds are in;
- `launch.fsdp`: inside one unit, a fold with `train.gpus_per_fold=N > 1` is trained by N processes
  that shard the model (FSDP through the Trainer's `fsdp` argument).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from vlmexp.config import Config

# The unit of work: (config of the run, fold index) -> the fold's done.json content.
FoldUnit = Callable[[Config, int], dict]


@dataclass(frozen=True)
class FoldJob:
    """Fold `k` of the run folder named `run` (e.g. "demo-1a2b3c4d"), whose full config is `cfg`."""

    run: str
    cfg: Config
    k: int


def unit_name(unit: FoldUnit) -> str:
    """'vlmexp.recipe:run_fold_task': how a unit travels to a process started by a command line."""
    return f"{unit.__module__}:{unit.__qualname__}"


def resolve_unit(name: str) -> FoldUnit:
    import importlib

    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies, so a kill -9 of `exp` or of a
    Ray worker takes its torchrun and the ranks with it instead of leaving them training on the GPUs
    (and a retried fold racing them). No-op on other systems."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def tied_command(module: str, args: list[str]) -> list[str]:
    """`python -m module args...`, in a process that dies with the one that starts it."""
    code = f"import vlmexp.launch as l; l._run_tied({module!r})"
    return [sys.executable, "-c", code, *args]


def _run_tied(module: str) -> None:
    import runpy

    die_with_parent()
    sys.argv = [module, *sys.argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
