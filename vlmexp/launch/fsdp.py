"""One fold over several GPUs: `train.gpus_per_fold=N` trains fold k in N processes that shard the model.

The unit (`recipe.run_fold_task`) of such a fold starts `torchrun --standalone --nproc_per_node=N
-m vlmexp.launch.fsdp CONFIG UNIT K` on the GPUs it was given (all of this machine's, or the N that a
Ray task asked for). Unlike `launch.torchrun`, the ranks keep torchrun's variables: the Trainer
(accelerate) joins them into one job. On GPUs the Trainer gets `fsdp="full_shard auto_wrap"` (FSDP2,
decoder and vision blocks wrapped as the model's `_no_split_modules` name them, the full state dict
gathered on rank 0 to save the adapter); LoRA and QLoRA both train this way. The global batch stays
`train.batch_size`: each rank takes batch_size / N rows, so the optimizer sees the same batches as one
process would. After training, rank 0 alone predicts the fold and writes its files; the other ranks end.

On the CPU accelerate has no FSDP (it shards only on GPU-like devices: a CPU job is plain DDP over gloo),
so there the same launch trains data-parallel; tests/test_launch_fsdp.py uses that to check the
launch, the batch split and the rank-0 outputs on 2 CPU processes, and shards for real on 2 GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from vlmexp.config import Config, load_config_file
from vlmexp.launch import FoldUnit, die_with_parent, resolve_unit, tied_command, unit_name

SHARDED = "VLMEXP_SHARDED_FOLD"  # "1" in the N processes that train one fold together


def in_sharded_fold() -> bool:
    return os.environ.get(SHARDED) == "1" and int(os.environ.get("WORLD_SIZE", 1)) > 1


def is_main_process() -> bool:
    """Rank 0 of a sharded fold, or any process that is not part of one."""
    return not in_sharded_fold() or int(os.environ.get("RANK", 0)) == 0


def launch_fold(cfg: Config, k: int, unit: FoldUnit, config_file: Path) -> None:
    """Train fold k in cfg.train.gpus_per_fold processes of this machine; returns when rank 0 has
    written the fold's files. `config_file` is where the exact config is written for the ranks."""
    from vlmexp.config import to_yaml
    from vlmexp.tables import write_text

    write_text(to_yaml(cfg), config_file)
    n = cfg.train.gpus_per_fold
    cmd = tied_command(
        "torch.distributed.run",
        [
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "vlmexp.launch.fsdp",
            str(config_file),
            unit_name(unit),
            str(k),
        ],
    )
    done = subprocess.run(cmd, check=False, env={**os.environ, SHARDED: "1"})
    if done.returncode != 0:
        raise RuntimeError(
            f"fold {k} sharded over {n} processes failed (torchrun exit {done.returncode}); "
            "rerun the same command to resume it"
        )


def trainer_args(cfg: Config) -> dict:
    """TrainingArguments fields for a sharded fold ({} otherwise), e.g. batch_size=8 over 2 GPUs:
    {"per_device_train_batch_size": 4, "fsdp": "full_shard auto_wrap", "fsdp_config": {...}}."""
    if not in_sharded_fold():
        return {}
    import torch

    world = int(os.environ["WORLD_SIZE"])
    args: dict = {"per_device_train_batch_size": cfg.train.batch_size // world}
    if torch.cuda.is_available():
        # FSDP2: parameters, gradients and optimizer state sharded over the fold's GPUs; rank 0
        # gathers the full (LoRA) state dict to save the adapter exactly as an unsharded fold would.
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {
            "version": 2,
            "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True,
        }
    return args


def worker(config_file: Path, unit: str, k: int) -> None:
    # Each rank drives its own GPU; the Trainer reads LOCAL_RANK for that. The frozen-tower feature
    # cache calls the vision tower outside the wrapped (sharded) model, so it stays off here; it is a
    # speed lever only (speed.* is outside the config hash), so the run is the same run.
    die_with_parent()
    cfg = load_config_file(config_file)
    cfg = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, vision_cache="off"))
    resolve_unit(unit)(cfg, k)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
