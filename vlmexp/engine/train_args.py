"""TrainConfig -> trl's `SFTConfig`: the project's settings, then `train.args`, every other trainer option.

`train.args.<name>=value` passes any `SFTConfig`/`TrainingArguments` field through, e.g.
`train.args.neftune_noise_alpha=5`, `train.args.torch_compile=true`, `train.args.deepspeed=ds.json`.
Precedence: a passed option wins over the project's defaults for the rest (`dataloader_num_workers=0`,
`push_to_hub=False`, ...); the names below that the project owns are refused at config load, since
setting them here would either duplicate a config key (one owner per fact: `learning_rate` is
`train.lr`) or break the run folder, resume or the answer-only loss.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch
from trl import SFTConfig

from vlmexp.config import Config, ConfigError
from vlmexp.engine import speed
from vlmexp.engine.memory import gradient_checkpointing_needed
from vlmexp.launch import fsdp as fsdp_launch

log = logging.getLogger(__name__)

SFT_FIELDS = {f.name for f in fields(SFTConfig)}
_HINTS = typing.get_type_hints(SFTConfig)  # e.g. neftune_noise_alpha: float | None
# transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns; gone in v6).
_CHECKPOINTING = (
    "activation_checkpointing" if "activation_checkpointing" in SFT_FIELDS else "gradient_checkpointing"
)

# Trainer options that a config key already sets: name -> the key to set instead.
FROM_CONFIG = {
    "num_train_epochs": "train.epochs",
    "max_steps": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "warmup_steps": "train.warmup_ratio",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optim",
    "bf16": "train.bf16",
    "tf32": "train.tf32",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "seed": "seed",
    "data_seed": "seed",
    "max_length": "train.max_length",
    "logging_steps": "train.logging_steps",
    "report_to": "train.report_to",
    "save_strategy": "train.save_every",
    "save_steps": "train.save_every",
    "eval_strategy": "train.eval / train.eval_every",
    "eval_steps": "train.eval_every",
    "metric_for_best_model": "metric",
}
# Trainer options the project fixes for the run folder, resume and the loss to work: name -> why.
FIXED = {
    "output_dir": "checkpoints live in the fold's folder (RunDir.checkpoint_dir)",
    "run_name": "each fold's tracker run is named <run>-fold<k>",
    "project": "the tracker groups a run's folds under the run's name",
    "save_total_limit": "a fold keeps its last and its best checkpoint",
    "load_best_model_at_end": "the best evaluation's checkpoint is always loaded at the end",
    "greater_is_better": "accuracy and macro-F1 are better when higher",
    "resume_from_checkpoint": "a rerun resumes a fold from its last checkpoint by itself",
    "completion_only_loss": "only the answer tokens are learned",
    "assistant_only_loss": "only the answer tokens are learned",
    "dataset_kwargs": "rows are collated by vlmexp (engine/encode.py)",
    "remove_unused_columns": "rows are collated by vlmexp (engine/encode.py)",
    "packing": "rows are collated by vlmexp (engine/encode.py), one sample per row",
    "use_cpu": "the device follows CUDA's availability",
    "disable_tqdm": "the progress display is vlmexp's own",
}


def check_trainer_args(args: dict) -> None:
    """Every problem of `train.args` in one ConfigError: unknown names (with the nearest field), and
    names the project owns (with the key to set instead, or why)."""
    problems = []
    for name in args:
        if name in FROM_CONFIG:
            key = FROM_CONFIG[name]
            problems.append(f"'train.args.{name}': vlmexp sets {name} from {key}; set {key} instead")
        elif name in FIXED:
            problems.append(f"'train.args.{name}' cannot be set: {FIXED[name]}")
        elif name not in SFT_FIELDS:
            near = difflib.get_close_matches(name, sorted(SFT_FIELDS), n=1, cutoff=0.0)
            problems.append(
                f"'train.args.{name}' is not an SFTConfig/TrainingArguments field; "
                f"did you mean 'train.args.{near[0]}'?"
            )
        elif not _accepts(_HINTS.get(name, typing.Any), args[name]):
            want = str(_HINTS[name]).replace("<class '", "").replace("'>", "")
            problems.append(f"'train.args.{name}={args[name]}': {name} takes {want}")
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "bad train.args:\n- " + "\n- ".join(problems)
        )


def _accepts(hint, value) -> bool:
    """Whether `value` fits a field's type hint; types other than None/bool/int/float/str/dict/list and
    enums (whose names are strings) are left to the trainer, e.g. float | None takes 5 but not "abc"."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for t in typing.get_args(hint) if union else (hint,):
        base = typing.get_origin(t) or t
        if t is type(None):
            if value is None:
                return True
        elif base is bool:
            if isinstance(value, bool):
                return True
        elif base in (int, float):
            if isinstance(value, int if base is int else (int, float)) and not isinstance(value, bool):
                return True
        elif base in (str, dict, list):
            if isinstance(value, base):
                return True
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            if isinstance(value, str):
                return True
        else:
            return True
    return False


def sft_config(
    cfg: Config,
    output_dir: Path,
    model,
    shape: tuple[int, int] | None = None,
    *,
    run_name: str | None = None,
    group: str = "",
    evaluating: bool = False,
) -> SFTConfig:
    """TrainConfig -> SFTConfig; CPU-safe (trl's defaults, bf16 and checkpointing, fail there).
    `shape`: (tokens, vision patches) per sample, for train.gradient_checkpointing=auto on a GPU;
    without it the estimate assumes train.max_length tokens.
    `run_name`/`group`: a fold's tracker run, e.g. "demo-1a2b3c4d-fold0" in "demo-1a2b3c4d"; with a
    run_name the trainer checkpoints (train.save_every) and reports (train.report_to), without one it is
    a bare trainer for the caller's own loop (the bench, unit tests). `evaluating`: EvalCallback
    validates, so the trainer tracks the best evaluation by cfg.metric."""
    fold = run_name is not None
    t = cfg.train
    check_trainer_args(t.args)
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ValueError(f"train.warmup_ratio={t.warmup_ratio} is a share of the steps in [0, 1), e.g. 0.05")
    cuda = torch.cuda.is_available()
    bf16 = {"on": True, "off": False, "auto": cuda and torch.cuda.is_bf16_supported()}[t.bf16]
    # Checkpointing cuts activation memory but costs 1.75x time (3B, batch 8: 19.1 vs 33.6 samples/s):
    # auto turns it on only when the estimated step would not fit in the GPU's free memory.
    tokens, patches = shape or (t.max_length, 0)
    checkpointing, why = gradient_checkpointing_needed(
        t.gradient_checkpointing, model, t.batch_size, tokens, patches, compiled=speed.compiles(model, cfg)
    )
    log.info("gradient checkpointing %s (%s)", "on" if checkpointing else "off", why)
    project = {
        "output_dir": str(output_dir),
        "num_train_epochs": t.epochs,
        # A fold sharded over N processes (train.gpus_per_fold) splits the batch and adds FSDP's fields.
        "per_device_train_batch_size": t.batch_size,
        **fsdp_launch.trainer_args(cfg),
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.lr,
        "lr_scheduler_type": t.scheduler,
        "warmup_steps": t.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a share of the steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "bf16": bf16 and cuda,
        "tf32": t.tf32 if cuda else None,
        _CHECKPOINTING: checkpointing and cuda,
        "use_cpu": not cuda,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "max_length": t.max_length,
        "logging_steps": t.logging_steps,
        # transformers checks every step's loss for NaN/inf in Python (`torch.isnan(loss)` as a bool):
        # a GPU sync per step, so the next batch's collation waits for the backward to finish instead
        # of overlapping it. The filter only changes the logged loss of a NaN step, never training.
        "logging_nan_inf_filter": False,
        "completion_only_loss": True,
        # The dataset holds row indices only; RowCollator builds the tensors, so trl prepares nothing.
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
        # Validation is EvalCallback's (real accuracy, on its own schedule); each evaluation is saved and
        # the trainer's own bookkeeping keeps the best one: save_total_limit=1 leaves the last checkpoint
        # and the best (state.best_model_checkpoint), e.g. checkpoint-12 and checkpoint-6.
        "eval_strategy": "no",
        "save_strategy": ("steps" if t.save_every else "epoch") if fold else "no",
        "save_steps": t.save_every or 500,
        "save_total_limit": 1,
        "metric_for_best_model": cfg.metric if evaluating and fold else None,
        "greater_is_better": True,
        "report_to": [t.report_to] if fold and t.report_to != "none" else [],
        "run_name": run_name,
        "project": group or "vlmexp",  # trackio's grouping of runs
        "push_to_hub": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # accelerate copies each batch tensor to the GPU with a blocking copy unless told otherwise: 6 host
        # syncs a step on the 3B (bench profile, VLMEXP_SYNC_DEBUG), each draining the GPU's queue at the
        # step's start, so the GPU idled while the host set up the next forward. Pinned batches copied
        # without blocking are queued behind the previous step's backward instead.
        "dataloader_pin_memory": cuda,
        "accelerator_config": {"non_blocking": cuda},
    }
    try:
        args = SFTConfig(**{**project, **t.args})
    except (TypeError, ValueError) as e:
        if not t.args:
            raise
        raise ConfigError(f"train.args {t.args}: the trainer refused them: {e}") from e
    if cuda and torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        # One process trains one fold on one GPU (folds go parallel through `gpus=N`, one process per
        # GPU); with 2 GPUs visible trl refuses to start ("does not support nn.DataParallel"), as seen
        # on 2 H200s with gpus=1. Resolve the devices first, then pin the count, as HF examples do.
        _ = args.n_gpu
        args._n_gpu = 1
    return args
