"""`launcher=ray`: every unfinished fold of every run is one Ray task; runs are finalised as folds land.

The driver (the `exp run`/`exp sweep` process) prepares each run folder, submits one task per pending
fold with `num_gpus=train.gpus_per_fold` (0 on a cluster without GPUs), and waits. When the last fold
of a run is in, `finish(run)` scores, votes and writes its submission and leaderboard row at once, while
other runs' folds keep the cluster busy. A task whose process dies (kill -9, a node lost) is rerun by
Ray up to `ray.max_retries` times and resumes from what the fold left on disk; an error raised by the
fold itself (bad data, out of memory) is not retried: it is reported with the run and fold, and every
other fold still finishes.

Tasks read and write the run folders directly, so `runs_dir` (and the data) must be storage that every
node mounts at the same path, and `exp` must be started from a folder that exists on every node
(relative paths such as runs_dir=runs are resolved there); a task that cannot see its run folder fails
at once with the node's name (`recipe.run_fold_task`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable

from vlmexp.config import RayConfig
from vlmexp.launch import FoldJob, FoldUnit

log = logging.getLogger("vlmexp")


def connect(ray_cfg: RayConfig):
    """The `ray` module, connected: the Ray instance this process already joined, the cluster at
    `ray.address` (auto, ray://HOST:10001), or a new local instance when no address is given."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "launcher=ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.40')"
        ) from None
    if not ray.is_initialized():
        if ray_cfg.address:
            ray.init(address=ray_cfg.address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    return ray


def _in_driver_cwd(unit: FoldUnit, cfg, k: int, cwd: str) -> dict:
    """Run on a worker: relative paths of the config (runs_dir=runs, data.dir=demo_data) mean what they
    meant where `exp` was started, so the task works from that folder, which must exist on this node."""
    if not os.path.isdir(cwd):
        raise FileNotFoundError(
            f"node {socket.gethostname()}: the folder exp was started from, {cwd}, does not exist here; "
            "start exp from a folder on storage every node mounts at the same path (docs/scaling.md)"
        )
    os.chdir(cwd)
    return unit(cfg, k)


def run_folds(
    jobs: list[FoldJob],
    runs: list[str],
    unit: FoldUnit,
    finish: Callable[[str], None],
    ray_cfg: RayConfig,
) -> None:
    """Run every job as a Ray task and call `finish(run)` for each of `runs` once all its folds are in
    (at once for a run with no job left). Raises at the end if any fold or finish failed; everything
    that finished stays on disk, so rerunning the same command resumes the rest."""
    ray = connect(ray_cfg)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    # A GPU task's worker must end with its task (max_calls=1): a reused worker keeps the CUDA context
    # of the GPU it had and would train the next fold there, whatever GPU Ray gives it (ray issue 29624).
    # Ray sets this itself only for num_gpus given to ray.remote, not through .options() as here.
    task = ray.remote(max_calls=1)(_in_driver_cwd) if has_gpus else ray.remote(_in_driver_cwd)
    cwd = os.getcwd()
    refs = {}
    for job in jobs:
        opts = {
            "num_cpus": job.cfg.ray.cpus_per_fold,
            "num_gpus": job.cfg.train.gpus_per_fold if has_gpus else 0,
            "max_retries": job.cfg.ray.max_retries,
            "retry_exceptions": False,  # a fold's own error would fail the same way again
            "name": f"{job.run}/fold{job.k}",
        }
        refs[task.options(**opts).remote(unit, job.cfg, job.k, cwd)] = job
    log.info("ray: %d fold tasks of %d runs submitted (%s)", len(jobs), len(runs), ray.cluster_resources())

    left = Counter(job.run for job in jobs)
    failed: dict[str, list[str]] = {}

    def _finish(run: str) -> None:
        try:
            finish(run)
        except Exception as e:  # one run's failure must not lose the others' results
            failed.setdefault(run, []).append(f"finalize: {type(e).__name__}: {e}")

    for run in runs:
        if not left[run]:
            _finish(run)
    while refs:
        [ready], _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(ready)
        try:
            ray.get(ready)
        except Exception as e:
            failed.setdefault(job.run, []).append(f"fold {job.k}: {_short(e)}")
            log.error("%s fold %d failed: %s", job.run, job.k, _short(e))
        left[job.run] -= 1
        if not left[job.run] and job.run not in failed:
            _finish(job.run)
    if failed:
        lines = "\n".join(f"  {run}: {msg}" for run, msgs in failed.items() for msg in msgs)
        raise RuntimeError(
            f"{len(failed)} of {len(runs)} runs did not finish on Ray:\n{lines}\n"
            "finished folds and runs are kept: rerun the same command to resume the rest"
        )


def _short(e: Exception) -> str:
    """The fold's own error (its last line), not Ray's wrapping traceback."""
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
