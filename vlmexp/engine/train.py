"""One fold's supervised fine-tuning with trl's `SFTTrainer`, checkpointed so a killed fold resumes.

Data goes to trl as prompt-completion rows, {"prompt", "completion", "images"}, built from the
model's own chat template (`samples.to_prompt_completion`): the prompt is the chat up to the
generation prompt, the completion `lead + answer + eot`, e.g. "red<|im_end|>". trl's VLM collator
then supervises only the completion tokens (completion_only_loss), for any chat template. (trl's
other route, messages + assistant_only_loss, needs a template trl recognises or one with
{% generation %} markers, and includes whatever the template puts after the end-of-turn token.)
The completion is tokenised on its own, exactly as `predict` scores it.
The trainer (trl's SFTTrainer with the project's levers), its row collator and `build_trainer` live
in engine/trainer.py.

Validation accuracy/macro-F1 come from `predict` on the fold's validation samples (EvalCallback),
logged through the trainer to every tracker (train.report_to) and to the fold's log.jsonl. The fold
checkpoints every epoch (or train.save_every steps) and after every evaluation but the last step's,
keeping the last and the best; a rerun after kill -9 resumes from the last (weights, optimizer,
scheduler, RNG, data order: the trainer's own resume_from_checkpoint). At the end the best weights
(in memory when the last step scored best, else its checkpoint) are saved as the fold's adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from transformers import PrinterCallback, Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmexp.config import Config
from vlmexp.engine import cls_head
from vlmexp.engine.async_save import PENDING_SUFFIX
from vlmexp.engine.callbacks import EvalCallback, JsonlLog, LogRelay, SkipFinalSave, SkipRepeatedSave
from vlmexp.engine.mix import mix_samples
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import to_prompt_completion
from vlmexp.engine.trainer import build_trainer
from vlmexp.launch import fsdp as fsdp_launch
from vlmexp.rundir import RunDir
from vlmexp.tables import read_json, write_json
from vlmexp.timing import phase

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path  # LoRA adapter (or the full model for finetune=full) + processor
    log_history: list[dict] = field(default_factory=list)  # trainer logs and val evaluations
    best_metric: float | None = None  # best validation cfg.metric; None when eval is off
    best_epoch: float | None = None  # epoch whose weights were saved
    train_seconds: float = 0.0
    resumed_from: str | None = None  # the checkpoint a rerun continued from, e.g. ".../checkpoint-6"
    batch_size: int | None = None  # rows per device step as trained, e.g. 24 for train.batch_size=auto
    lr: float | None = None  # the peak learning rate as trained, e.g. 3.46e-4 (auto's lr_rule applied)
    # The validation predictions of the kept weights (the best step's evaluation), not saved to JSON:
    # the recipe's OOF table when it predicts the validation rows as validation did (_validation_is_oof).
    val_table: pd.DataFrame | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FoldOutputs:
    """Where one fold's training writes: a run's fold (`for_fold`, the layout RunDir declares) or a bare
    folder (`under`, for tests and notebooks)."""

    adapter: Path  # the best (or last) weights + processor
    result: Path  # the TrainResult as JSON, written once the adapter is saved
    checkpoints: Path  # trainer checkpoints: the last and the best
    log: Path  # log.jsonl, one line per trainer log
    tensorboard: Path  # TensorBoard event files
    name: str  # the tracker run, e.g. "demo-1a2b3c4d-fold0"
    group: str  # the tracker group: the run, e.g. "demo-1a2b3c4d"

    @classmethod
    def for_fold(cls, run: RunDir, k: int) -> FoldOutputs:
        return cls(
            adapter=run.adapter_dir(k),
            result=run.train_result_path(k),
            checkpoints=run.checkpoint_dir(k),
            log=run.train_log_path(k),
            tensorboard=run.tensorboard_dir(k),
            name=f"{run.root.name}-fold{k}",
            group=run.root.name,
        )

    @classmethod
    def under(cls, out_dir: Path) -> FoldOutputs:
        d = Path(out_dir)
        files = (d / "adapter", d / "train_result.json", d / "checkpoints", d / "log.jsonl", d / "tb")
        return cls(*files, name=d.name, group=d.parent.name)


def train_fold(
    cfg: Config,
    model,
    processor,
    train_samples: list[dict],
    val_samples: list[dict],
    labels: list[str],
    out: Path | FoldOutputs,
    on_log=None,
    caches: RunCaches | None = None,
) -> TrainResult:
    """Fine-tune `model` (already LoRA-wrapped for finetune=lora) and save it to `out.adapter`; resume
    from `out.checkpoints` when an earlier process left one there, or load `out.adapter` into `model`
    when `out.result` says training finished. `out`: a FoldOutputs, or a folder to lay one out under.
    `caches` carries the run's encoded rows and vision features across folds."""
    if not train_samples:
        raise ValueError("train_fold got no training samples")
    out = out if isinstance(out, FoldOutputs) else FoldOutputs.under(out)
    caches = caches if caches is not None else RunCaches.for_run(cfg, processor)
    evaluator = None
    if cfg.train.eval and val_samples:
        evaluator = EvalCallback(cfg, processor, val_samples, labels, caches=caches)
    elif cfg.train.eval:
        log.warning("train.eval is on but the fold has no validation samples: keeping the final weights")
    callbacks = [
        evaluator,
        SkipRepeatedSave(),
        SkipFinalSave(),
        JsonlLog(out.log),
        LogRelay(on_log) if on_log else None,
    ]
    # model.head=cls: prompt-only rows and cross-entropy on a linear head (engine/cls_head.py)
    build = cls_head.trainer_builder(train_samples, labels) if cfg.model.head == "cls" else build_trainer
    trainer = build(
        cfg,
        model,
        processor,
        training_dataset(cfg, processor, train_samples) if cfg.model.head == "lm" else [],
        out.checkpoints,
        [c for c in callbacks if c is not None],
        caches=caches,
        evaluator=evaluator,
        run_name=out.name,
        group=out.group,
    )
    if on_log is not None:
        # the caller draws its own progress from on_log; the trainer's printed dicts would garble it
        trainer.remove_callback(PrinterCallback)
    if out.result.exists():
        # Trained before a kill (e.g. while predicting): the saved weights, not the epochs after the
        # best one trained again from its checkpoint.
        log.info("fold training finished before: reusing %s", out.adapter)
        trainer._load_from_checkpoint(str(out.adapter))  # the trainer's loader: adapter or full model
        model.eval()
        done = read_json(out.result)
        return TrainResult(**{**done, "adapter_dir": out.adapter})
    resume = last_checkpoint(out.checkpoints)
    if resume is not None:
        log.info("resuming fold training from %s", resume)
    _point_tensorboard(trainer, out.tensorboard, resume)
    t0 = time.time()
    with phase("train_steps"), _tracker_env(cfg, out):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - t0

    best_metric = best_epoch = val_table = None
    state = trainer.state
    if evaluator is not None and state.best_global_step:
        # The last step's weights are in memory and were not checkpointed (SkipFinalSave): load only an
        # earlier best, found by its folder name (the run folder may have moved since it was written).
        if state.best_global_step != state.global_step:
            state.best_model_checkpoint = str(out.checkpoints / f"checkpoint-{state.best_global_step}")
            trainer._load_best_model()  # the trainer's own loader: adapter, full model, FSDP or DeepSpeed
        best_metric = state.best_metric
        best_epoch = next(
            e["epoch"]
            for e in state.log_history
            if "eval_macro_f1" in e and e["step"] == state.best_global_step
        )
        log.info("best epoch %.2f: val %s %.4f", best_epoch, cfg.metric, best_metric)
        # None when that evaluation ran in an earlier, killed process (this one resumed after it)
        val_table = evaluator.tables.get(state.best_global_step)
    else:
        best_epoch = float(state.epoch or cfg.train.epochs)
    with phase("save"):
        if fsdp_launch.in_sharded_fold():
            trainer.save_model(str(out.adapter))  # gathers the sharded weights; rank 0 writes them
        else:
            model.save_pretrained(out.adapter)
            if cfg.model.head == "cls":
                cls_head.save_head(model, out.adapter)
        if fsdp_launch.is_main_process():
            processor.save_pretrained(out.adapter)
    model.eval()
    result = TrainResult(
        adapter_dir=out.adapter,
        log_history=list(state.log_history),
        best_metric=best_metric,
        best_epoch=best_epoch,
        train_seconds=round(seconds, 2),
        resumed_from=str(resume) if resume else None,
        batch_size=trainer.args.per_device_train_batch_size,
        lr=trainer.args.learning_rate,
        val_table=val_table,
    )
    if fsdp_launch.is_main_process():
        saved = {k: v for k, v in result.__dict__.items() if k != "val_table"}
        write_json({**saved, "adapter_dir": str(out.adapter)}, out.result)
    return result


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, e.g. checkpoint-12; None when there is none.

    A kill -9 while the trainer writes checkpoint-N leaves it without (or with half) its
    trainer_state.json, which the trainer writes after the weights, optimizer and RNG, or with the
    optimizer's `.tmp` file of the background write (engine/async_save.py): such a folder is removed,
    and the fold resumes from the one before it."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.rsplit("-", 1)[1].isdigit()),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )
    for ckpt in reversed(found):
        try:
            json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            if any(ckpt.glob(f"*{PENDING_SUFFIX}")):  # its optimizer file was still being written
                raise OSError("unfinished write")
            return ckpt
        except (OSError, json.JSONDecodeError):
            log.warning("removing %s: written only in part (killed while saving)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _point_tensorboard(trainer: Trainer, log_dir: Path, resume: Path | None) -> None:
    """TensorBoard events of the fold go to `log_dir`, e.g. runs/demo-1a2b3c4d/tb/fold0, so that
    `tensorboard --logdir runs` lists every run's folds. A resumed fold hides the events the killed
    process wrote after its checkpoint (they are logged again)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(log_dir)
            if resume is not None and trainer.is_world_process_zero():
                from torch.utils.tensorboard import SummaryWriter

                step = int(resume.name.rsplit("-", 1)[1])
                cb.tb_writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1)


@contextmanager
def _tracker_env(cfg: Config, out: FoldOutputs) -> Iterator[None]:
    """The fold's tracker run joins its run's group: wandb through WANDB_RUN_GROUP, mlflow through
    MLFLOW_TAGS (tensorboard by folder, trackio by project: sft_config). Set for this fold only, and
    never over the user's own value. wandb's run is finished after the fold, so the next fold starts
    its own instead of logging into this one."""
    env = {}
    if cfg.train.report_to == "wandb":
        env = {"WANDB_RUN_GROUP": out.group, "WANDB_PROJECT": "vlmexp"}
    elif cfg.train.report_to == "mlflow":
        env = {"MLFLOW_TAGS": json.dumps({"vlmexp.run": out.group, "vlmexp.fold_run": out.name})}
    mine = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)
        wandb = sys.modules.get("wandb")  # imported by the trainer's WandbCallback, if it ran
        if cfg.train.report_to == "wandb" and wandb is not None and wandb.run is not None:
            wandb.finish()


def training_dataset(cfg: Config, processor, train_samples: list[dict]) -> list[dict]:
    """Prompt-completion rows {"prompt", "completion", "images"} of the competition samples, plus the
    mixed-in general samples. Kept in memory as they are: a `datasets` table would store every image
    as PNG and decode it again at every step."""
    rows = [to_prompt_completion(processor, s) for s in train_samples]
    if cfg.train.mix_dataset and cfg.train.mix_ratio > 0:
        mixed = mix_samples(cfg, len(train_samples))
        rows += [to_prompt_completion(processor, s) for s in mixed]
        log.info("mixed in %d general samples from %s", len(mixed), cfg.train.mix_dataset)
    return rows
