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

from omegaconf import OmegaConf

from vlmexp.config import Config, to_yaml, validate
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


def worker(cfg_path: Path) -> None:
    import torch

    from vlmexp.recipe import prepare, run_fold

    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(cfg_path)))
    validate(cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    exp = prepare(cfg)
    for k in range(cfg.folds):
        if k % world == rank and not exp.run.fold_done(k):
            run_fold(exp, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
