"""Folds in parallel, one process per GPU, launched through torchrun (not a scheduler of our own).

`exp run gpus=2 ...` prepares the run as usual, then starts
`torchrun --standalone --nproc_per_node=2 -m vlmexp.parallel runs/<name>/config.yaml`; rank r trains
the unfinished folds k with k % world_size == r on GPU r (LOCAL_RANK). Folds share nothing while
training, so no process group is needed; the parent scores and votes once torchrun returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vlmexp.config import Config, load_config_file, to_yaml
from vlmexp.tables import write_text


def launch_folds(cfg: Config, gpus: int) -> None:
    from vlmexp.rundir import RunDir

    run = RunDir.for_config(cfg)
    # The exact config, overrides and all, travels as a file: argv would need re-parsing.
    cfg_path = write_text(to_yaml(cfg), run.path("parallel_config.yaml"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "vlmexp.parallel",
        str(cfg_path),
    ]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"parallel fold training failed (torchrun exit {done.returncode}); finished folds are kept: "
            "rerun the same command to resume the rest"
        )


# torchrun's variables: left in place, the Trainer (accelerate) would join the ranks into one DDP job,
# i.e. a DistributedSampler giving each fold half its rows and gradients averaged across folds
# (seen on 2 H200s: 8 steps instead of 15 per fold). Each rank must train its folds alone.
_TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def _become_single_gpu_process() -> tuple[int, int]:
    """(rank, world size) of this torchrun process, which from now on sees only its own GPU
    (CUDA_VISIBLE_DEVICES) and no torchrun variables. Call before anything initialises CUDA."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
    for var in _TORCHRUN_VARS:
        os.environ.pop(var, None)
    return rank, world


def worker(cfg_path: Path) -> None:
    rank, world = _become_single_gpu_process()
    from vlmexp.recipe import prepare, run_fold

    cfg = load_config_file(cfg_path)
    exp = prepare(cfg)
    for k in range(cfg.folds):
        if k % world == rank and not exp.run.fold_done(k):
            run_fold(exp, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
