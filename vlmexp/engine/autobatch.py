"""`train.batch_size=auto`: the largest batch whose step fits in free GPU memory, and the one place
where the learning rate follows the batch size (`train.lr_rule`).

Choice: the largest of CANDIDATES whose estimated training step (`memory.activation_bytes`, the same
estimate `train.gradient_checkpointing=auto` uses) times MARGIN fits in the free memory, so the step
runs without checkpointing (which costs 1.75x time). On an H200 with the Qwen2.5-VL-3B shape (570
tokens, language-only LoRA) batch 24 is estimated at 90.8 GiB x 1.3 <= 131.1 GiB free and batch 32
is not: 24, the batch measured at 45.4% MFU (docs/performance.md, run K). No GPU: BASE_BATCH, logged.

Learning rate: `train.lr` is the rate for BASE_BATCH rows a step. A batch B takes B/8 times fewer
optimizer steps per epoch; at the same rate the demo's CV fell from 0.712 to 0.567 macro-F1 at batch
24 (ENVIRONMENT.md, December). lr_rule=sqrt (default) uses lr x sqrt(B/8), the square-root rule for
Adam-type optimizers (Malladi et al., 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms"); linear uses lr x B/8 (Goyal et al., 2017, for SGD); none keeps lr. The rule applies only
when the batch size is chosen here: an explicit train.batch_size keeps train.lr as given.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from vlmexp.engine import memory

log = logging.getLogger(__name__)

BASE_BATCH = 8  # TrainConfig's default batch size, the batch train.lr is meant for
CANDIDATES = (8, 16, 24, 32, 48, 64)
MARGIN = 1.3  # as gradient_checkpointing_needed: allocator slack, the vision feature cache, fragmentation


def scaled_lr(lr: float, batch_size: int, rule: str) -> float:
    """train.lr for `batch_size` rows a step under `rule`, e.g. scaled_lr(2e-4, 24, "sqrt") = 3.46e-4."""
    ratio = batch_size / BASE_BATCH
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "linear":
        return lr * ratio
    if rule == "none":
        return lr
    raise ValueError(f"train.lr_rule={rule!r}: choose sqrt, linear or none")


def choose(model, tokens: int, patches: int, free_bytes: int | None = None) -> tuple[int, str]:
    """(batch size, why) for samples of `tokens` tokens and `patches` vision patches each.

    Always from the eager estimate, also under speed.compile: a speed lever must not change the batch,
    and with it the run's results. Compile's smaller estimate (memory.COMPILED_FIT) picked 32 for the
    3B on an H200, and that run's CV fell from 0.694 to 0.616 (run S, docs/performance.md). Under
    compile the estimate still decides checkpointing (memory.gradient_checkpointing_needed), which
    leaves the results as they are."""
    if free_bytes is None:
        if not torch.cuda.is_available():
            return BASE_BATCH, f"no GPU: the default {BASE_BATCH}"
        free_bytes = memory.free_gpu_bytes()

    def need(b: int) -> int:
        return memory.activation_bytes(model, b, tokens, patches)

    fits = [b for b in CANDIDATES if need(b) * MARGIN <= free_bytes]
    if not fits:
        free = free_bytes / 2**30
        return BASE_BATCH, f"even batch {CANDIDATES[0]} exceeds {free:.1f} GiB free (checkpointing decides)"
    return fits[-1], f"~{need(fits[-1]) / 2**30:.1f} GiB x {MARGIN} fit in {free_bytes / 2**30:.1f} GiB free"


def resolve(cfg, model, shape: tuple[int, int] | None, free_bytes: int | None = None):
    """`cfg` with train.batch_size a number and train.lr scaled by train.lr_rule when the batch size is
    auto; `cfg` itself otherwise. `shape`: (tokens, patches) of the largest sample (trainer._probe_shape)."""
    t = cfg.train
    if t.batch_size != "auto":
        return cfg
    tokens, patches = shape or (t.max_length, 0)
    if t.gpus_per_fold > 1:
        # A sharded fold's free memory per rank says little about its step (FSDP gathers and frees
        # layers as it goes): the base batch, a multiple of the ranks, e.g. 8 over 4 GPUs, 9 over 3.
        n = t.gpus_per_fold
        batch, why = -(-BASE_BATCH // n) * n, f"a fold sharded over {n} GPUs: the base batch"
    else:
        batch, why = choose(model, tokens, patches, free_bytes)
    lr = scaled_lr(t.lr, batch, t.lr_rule)
    rule = t.lr_rule
    log.info("train.batch_size=auto: %d (%s); train.lr %.3g -> %.3g (lr_rule=%s)", batch, why, t.lr, lr, rule)
    return dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=batch, lr=lr))
