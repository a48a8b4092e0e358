"""`gpus=N` on one machine: one process per GPU through torchrun, each running its share of the units.

`launch_folds(cfg, pending, unit, config_file)` starts
`torchrun --standalone --nproc_per_node=N -m vlmexp.launch.torchrun CONFIG UNIT 0,2,4`; rank r runs
the pending folds k with k % N == r on GPU r (LOCAL_RANK). Folds share nothing while training, so no
process group is needed: each rank forgets torchrun's variables and sees only its own GPU. The parent
scores and votes once torchrun returns.

Why torchrun and not Ray for one machine (reasoned, not yet measured on a multi-GPU device): a torchrun
rank lives for the whole run and keeps the run's caches (encoded rows, frozen-tower features) across
the folds it trains, while a Ray GPU task runs in a fresh worker process (Ray ends a GPU task's worker
after each task to give its memory back), paying imports and the per-run preparation for every fold
(about 10 s a fold outside training measured for the 3B shape on an H200). With K equal-sized folds the
static k % N split costs nothing over a dynamic queue; on a cluster, or for a sweep, `launcher=ray`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vlmexp.config import Config, load_config_file
from vlmexp.launch import FoldUnit, die_with_parent, resolve_unit, tied_command, unit_name


def launch_folds(cfg: Config, pending: list[int], unit: FoldUnit, config_file: Path) -> None:
    """Run `unit(cfg, k)` for every k in `pending`, spread over cfg.gpus processes of this machine.
    `config_file` is where the exact config (overrides and all) is written for the processes to read."""
    from vlmexp.config import to_yaml
    from vlmexp.tables import write_text

    write_text(to_yaml(cfg), config_file)
    cmd = tied_command(
        "torch.distributed.run",
        [
            "--standalone",
            f"--nproc_per_node={min(cfg.gpus, len(pending))}",
            "-m",
            "vlmexp.launch.torchrun",
            str(config_file),
            unit_name(unit),
            ",".join(map(str, pending)),
        ],
    )
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"parallel fold training failed (torchrun exit {done.returncode}); finished folds are kept: "
            "rerun the same command to resume the rest"
        )


# torchrun's variables: left in place, the Trainer (accelerate) would join the ranks into one DDP job,
# i.e. a DistributedSampler giving each fold half its rows and gradients averaged across folds
# (seen on 2 H200s: 8 steps instead of 15 per fold). Each rank must train its folds alone.
TORCHRUN_VARS = (
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


def become_single_gpu_process() -> tuple[int, int]:
    """(rank, world size) of this torchrun process, which from now on sees only its own GPU
    (CUDA_VISIBLE_DEVICES) and no torchrun variables. Call before anything initialises CUDA."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
    for var in TORCHRUN_VARS:
        os.environ.pop(var, None)
    return rank, world


def worker(config_file: Path, unit: str, pending: list[int]) -> None:
    die_with_parent()
    rank, world = become_single_gpu_process()
    cfg, run_unit = load_config_file(config_file), resolve_unit(unit)
    for i, k in enumerate(pending):
        if i % world == rank:
            run_unit(cfg, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], [int(k) for k in sys.argv[3].split(",")])
