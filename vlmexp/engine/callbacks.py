"""Trainer callbacks: real validation accuracy/macro-F1 with best-checkpoint keeping, and log relay.

Token accuracy says little about classification, so `EvalCallback` runs the same `predict` the
fold's OOF predictions use on the validation samples, every `train.eval_every` epochs, and keeps
a copy of the trainable weights of the best epoch by `cfg.metric`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from vlmexp.config import Config
from vlmexp.engine.predict import predict
from vlmexp.metrics import score
from vlmexp.timing import phase

log = logging.getLogger(__name__)


class EvalCallback(TrainerCallback):
    def __init__(
        self, cfg: Config, processor, val_samples: list[dict], labels: list[str], on_log=None, caches=None
    ):
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
        self.caches = caches  # encode.RunCaches: validation prompts are encoded once, not every epoch
        # not `self.on_log`: that name is the TrainerCallback hook itself
        self.sink = on_log
        self.every = cfg.train.eval_every
        self.next_at = self.every
        self.last_epoch = 0.0
        self.best_metric: float | None = None
        self.best_epoch: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # state.epoch is fractional (e.g. 0.5 after half an epoch), so eval_every=0.5 works too.
        if state.epoch is not None and state.epoch >= self.next_at - 1e-6:
            self.evaluate(model, state)
            while self.next_at <= state.epoch + 1e-6:
                self.next_at += self.every

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.epoch is not None and state.epoch > self.last_epoch + 1e-6:  # e.g. epochs=2.5, eval_every=1
            self.evaluate(model, state)

    def evaluate(self, model, state) -> dict:
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
        gold = [s["label"] for s in self.val_samples]
        metrics = score(gold, table["pred"], self.labels)
        epoch = round(float(state.epoch), 4)
        entry = {
            "epoch": epoch,
            "step": state.global_step,
            "eval_accuracy": metrics["accuracy"],
            "eval_macro_f1": metrics["macro_f1"],
            "eval_unparsed": metrics["unparsed"],
            "eval_seconds": round(time.time() - t0, 2),
        }
        value = metrics[self.cfg.metric]
        if self.best_metric is None or value > self.best_metric:
            self.best_metric, self.best_epoch = value, epoch
            self.best_state = trainable_state(model)
        entry["eval_best"] = self.best_metric
        state.log_history.append(entry)
        self.last_epoch = float(state.epoch)
        log.info(
            "epoch %.2f: val accuracy %.4f, macro-F1 %.4f", epoch, metrics["accuracy"], metrics["macro_f1"]
        )
        if self.sink is not None:
            self.sink({**entry, "max_steps": state.max_steps})
        return entry


class LogRelay(TrainerCallback):
    """Pass each trainer log to `on_log`, with the step, e.g.
    {"step": 12, "max_steps": 60, "epoch": 0.6, "loss": 1.93, "lr": 1.8e-4, ...}."""

    def __init__(self, on_log: Callable[[dict], None]):
        self.sink = on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = {"step": state.global_step, "max_steps": state.max_steps, **(logs or {})}
        if "learning_rate" in entry:
            entry["lr"] = entry["learning_rate"]
        if "epoch" not in entry and state.epoch is not None:
            entry["epoch"] = state.epoch
        self.sink({k: v for k, v in entry.items() if not (isinstance(v, float) and math.isnan(v))})


def trainable_state(model) -> dict[str, torch.Tensor]:
    """CPU copy of the parameters being trained (the LoRA weights; every weight for finetune=full)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))
