"""Trainer callbacks: when to validate (real accuracy/macro-F1), log relay, and the fold's log.jsonl.

Token accuracy says little about classification, so `EvalCallback` asks the trainer to evaluate every
`train.eval_every` epochs (and at the end of a fractional last epoch) and computes the metrics with the
same `predict` the fold's OOF predictions use. Each evaluation's table is kept by step (`tables`): the
kept (best) step's table is the fold's OOF table, so the recipe does not predict the same rows with the
same weights again. The trainer logs them through its own `log`, so every
tracker (TensorBoard, wandb, ...) and `log.jsonl` sees them, and every evaluation is checkpointed: the
trainer's best-checkpoint bookkeeping (`metric_for_best_model`) then keeps the best epoch on disk.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from transformers import TrainerCallback

from vlmexp.config import Config
from vlmexp.engine.predict import predict
from vlmexp.metrics import score
from vlmexp.timing import phase

log = logging.getLogger(__name__)

_EPS = 1e-6  # state.epoch is a float sum, e.g. 0.9999999 after one epoch of 3 steps


class EvalCallback(TrainerCallback):
    def __init__(self, cfg: Config, processor, val_samples: list[dict], labels: list[str], caches=None):
        unlabelled = [s["id"] for s in val_samples if s.get("label") not in labels]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} validation samples have no gold label among the labels, e.g. "
                f"{unlabelled[0]!r}; build them from rows with a label column (with_answer may be False)"
            )
        if cfg.train.eval_every <= 0:
            raise ValueError(f"train.eval_every={cfg.train.eval_every} must be > 0 epochs, e.g. 1 or 0.5")
        self.cfg = cfg
        self.processor = processor
        self.val_samples = val_samples
        self.labels = labels
        self.caches = caches  # run_caches.RunCaches: validation prompts are encoded once, not every epoch
        self.every = cfg.train.eval_every
        # step -> the validation table at that step, e.g. {15: <80 rows>, 30: <80 rows>}: a few KB each
        self.tables: dict[int, pd.DataFrame] = {}
        self.last_epoch = 0.0
        self.next_at = self.every

    def on_train_begin(self, args, state, control, **kwargs):
        # A fold resumed from a checkpoint has already evaluated what its log_history holds, e.g.
        # epochs 1 and 2 of 3: the next evaluation is at epoch 3, not 1.
        done = [e["epoch"] for e in state.log_history if "eval_macro_f1" in e]
        self.last_epoch = max(done, default=0.0)
        self.next_at = self.every * (math.floor(self.last_epoch / self.every + _EPS) + 1)

    def on_step_end(self, args, state, control, **kwargs):
        # state.epoch is fractional (e.g. 0.5 after half an epoch), so eval_every=0.5 works too; the
        # last step evaluates as well when the run ends between two, e.g. epochs=2.5 with eval_every=1.
        epoch = state.epoch or 0.0
        last_step = state.global_step >= state.max_steps and epoch > self.last_epoch + _EPS
        if epoch >= self.next_at - _EPS or last_step:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_epoch = float(state.epoch)
        while self.next_at <= self.last_epoch + _EPS:
            self.next_at += self.every
        # Every evaluation gets a checkpoint at its step, so whichever turns out best is on disk.
        control.should_save = True

    def metrics(self, model, step: int | None = None) -> dict[str, float]:
        """{"eval_accuracy", "eval_macro_f1", "eval_unparsed", "eval_seconds"} on the validation samples;
        the predictions are kept as `tables[step]` when `step` (the trainer's global step) is given."""
        t0 = time.time()
        was_training = model.training
        with phase("validation"):
            table = predict(
                self.cfg,
                model,
                self.processor,
                self.val_samples,
                self.labels,
                progress=False,
                caches=self.caches,
            )
        if was_training:
            model.train()
        if step is not None:
            self.tables[step] = table
        gold = [s["label"] for s in self.val_samples]
        m = score(gold, table["pred"], self.labels)
        log.info("val accuracy %.4f, macro-F1 %.4f", m["accuracy"], m["macro_f1"])
        return {
            "eval_accuracy": m["accuracy"],
            "eval_macro_f1": m["macro_f1"],
            "eval_unparsed": m["unparsed"],
            "eval_seconds": round(time.time() - t0, 2),
        }


class SkipRepeatedSave(TrainerCallback):
    """An evaluation at an epoch's last step has just saved checkpoint-N; the epoch end would write the
    same folder again (and a kill in the middle of that would spoil a finished checkpoint)."""

    def __init__(self):
        self.saved_at = -1

    def on_save(self, args, state, control, **kwargs):
        self.saved_at = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save and self.saved_at == state.global_step:
            control.should_save = False


class SkipFinalSave(TrainerCallback):
    """No trainer checkpoint at the last step: the fold's adapter is saved right after training, and a
    kill before that resumes from the previous checkpoint (one epoch of a 2-epoch fold again, the same
    weights). Each checkpoint holds the optimizer state; on a 3B demo run the five final ones were
    about 2.5 s of 4.9 s checkpointing (run AD, docs/performance.md). When the last step scored best,
    `train_fold` keeps the weights in memory instead of loading a checkpoint that was never written."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False

    # after EvalCallback's on_evaluate in the list, which asks for a checkpoint at every evaluation
    on_epoch_end = on_evaluate = on_step_end


class LogRelay(TrainerCallback):
    """Pass each trainer log to `on_log`, with the step, e.g.
    {"step": 12, "max_steps": 60, "epoch": 0.6, "loss": 1.93, "lr": 1.8e-4, ...}."""

    def __init__(self, on_log: Callable[[dict], None]):
        self.sink = on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.sink({"max_steps": state.max_steps, **log_entry(state, logs)})


class JsonlLog(TrainerCallback):
    """`folds/fold{k}/log.jsonl`: one JSON line per trainer log, e.g.
    {"step": 12, "epoch": 0.6, "loss": 1.93, "lr": 1.8e-4, "grad_norm": 0.8} or
    {"step": 15, "epoch": 1.0, "eval_accuracy": 0.75, "eval_macro_f1": 0.71, ...}.

    A fold resumed from checkpoint-N keeps the lines up to step N and drops the ones the killed
    process wrote after it (they are logged again), so the file reads like an uninterrupted run's."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # a sharded fold's ranks all log the same lines: rank 0 writes
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [e for e in _read_jsonl(self.path) if e.get("step", 0) <= state.global_step]
        # The end-of-training summary (train_runtime, ...) is logged again by every train() call.
        kept = [e for e in kept if "train_runtime" not in e]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        tmp.replace(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(log_entry(state, logs)) + "\n")


def log_entry(state, logs: dict | None) -> dict:
    """A trainer log with its step and epoch, `learning_rate` renamed `lr`, NaNs dropped."""
    entry = {"step": state.global_step, **(logs or {})}
    if "learning_rate" in entry:
        entry["lr"] = entry.pop("learning_rate")
    if "epoch" not in entry and state.epoch is not None:
        entry["epoch"] = state.epoch
    return {k: v for k, v in entry.items() if not (isinstance(v, float) and math.isnan(v))}


def _read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a log.jsonl; a line cut by a kill -9 is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
