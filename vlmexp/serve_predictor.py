"""A finished run's fold models answering one chat request: `RunPredictor` loads the folds once (one base
model, each fold a named LoRA adapter) and answers a sample as local prediction would; `completion` turns
an OpenAI chat-completions body into that answer. The HTTP side is `serve.py`."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pandas as pd

from vlmexp.config import Config
from vlmexp.engine.openai_backend import PROBS_FIELD, SERVED_FOLD_MODEL
from vlmexp.prompts.render import load_template
from vlmexp.rundir import RunDir
from vlmexp.serve_request import MAX_PIXELS, RequestError, request_sample, requested_choices
from vlmexp.tables import PROB_PREFIX, probs


def load_run_config(run_dir: Path) -> Config:
    run = RunDir(Path(run_dir))
    if not run.config_path.exists():
        raise FileNotFoundError(f"{run_dir}: no {run.config_path.name}; is this a run folder (runs/<name>)?")
    return run.config()


def run_labels(run_dir: Path, cfg: Config) -> list[str]:
    """Class order from the run's own prediction tables, else from the competition's labels.json."""
    run = RunDir(Path(run_dir))
    for table in [run.path("test_probs.csv"), *(run.fold_dir(k) / "oof.csv" for k in range(cfg.folds))]:
        if table.exists():
            cols = pd.read_csv(table, nrows=0).columns
            labels = [c[len(PROB_PREFIX) :] for c in cols if c.startswith(PROB_PREFIX)]
            if labels:
                return labels
    from vlmexp.data import load_competition

    return load_competition(cfg.data).labels


class RunPredictor:
    """A run's fold models behind `answer(sample, choices, model)`: the fold ensemble under the run's
    name and each fold under `<run>/fold<k>` (one base model, each fold a named LoRA adapter), or
    with `fold=K` that one fold only."""

    def __init__(self, run_dir: Path, fold: int | None = None):
        from vlmexp.models.load import load_processor

        self.run = RunDir(Path(run_dir))
        self.run_dir = self.run.root
        self.cfg = load_run_config(self.run_dir)
        self.labels = run_labels(self.run_dir, self.cfg)
        self.marker = self._marker()
        self.folds = self._folds(fold)
        # model name -> the folds that answer, e.g. {"demo-1a2b": [0, 1], "demo-1a2b/fold0": [0], ...}
        self.models = {SERVED_FOLD_MODEL.format(run=self.run_dir.name, k=k): [k] for k in self.folds}
        if fold is None:
            self.models = {self.run_dir.name: list(self.folds)} | self.models
        self.name = next(iter(self.models))  # the ensemble, or the one fold
        self.processor = load_processor(self.cfg)
        self._models = dict(zip(self.folds, self._load(), strict=True))
        self._lock = threading.Lock()  # one model call at a time: torch modules are not re-entrant

    def _marker(self) -> str:
        """The marker of the template the run trained on: its saved copy (runs/<name>/prompt/) first."""
        saved = self.run_dir / "prompt"
        return load_template(self.cfg.prompt, str(saved) if saved.is_dir() else self.cfg.prompts.dir).marker

    def _folds(self, fold: int | None) -> list[int]:
        done = self.run.done_folds(self.cfg.folds)
        if fold is not None:
            if fold not in done:
                raise FileNotFoundError(
                    f"{self.run_dir}: fold {fold} is not finished (no {self.run.fold_dir(fold)}/done.json); "
                    f"finished folds: {done or 'none'}"
                )
            return [fold]
        if len(done) != self.cfg.folds:
            raise FileNotFoundError(
                f"{self.run_dir}: {len(done)} of {self.cfg.folds} folds finished ({done}); finish the run "
                f"with exp run, or serve one finished fold with --fold K"
            )
        return done

    def _load(self) -> list[tuple[object, str | None]]:
        """[(model, adapter name)] per fold: LoRA folds share one base model, each fold a named adapter."""
        from vlmexp.models.load import load_for_inference

        dirs = [self.run.adapter_dir(k) for k in self.folds]
        if all((d / "adapter_config.json").exists() for d in dirs):
            model = load_for_inference(self.cfg, dirs[0])
            for k, d in zip(self.folds[1:], dirs[1:], strict=True):
                model.load_adapter(str(d), adapter_name=f"fold{k}", is_trainable=False)
            names = ["default"] + [f"fold{k}" for k in self.folds[1:]]
            if self.cfg.model.head == "cls":  # model.head=cls: each fold's adapter has its own head
                from vlmexp.engine.cls_head import load_head

                self._heads = {name: load_head(model, d) for name, d in zip(names, dirs, strict=True)}
            return [(model, name) for name in names]
        # finetune=full: each fold saved a whole model
        full = []
        for d in dirs:
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"{d}: neither a LoRA adapter nor a saved model; retrain this fold")
            cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, name=str(d)))
            full.append((load_for_inference(cfg, None), None))
        return full

    def answer(
        self, sample: dict, choices: list[str] | None = None, model_name: str = ""
    ) -> tuple[str, dict[str, float]]:
        """(message content, {label: probability}) for one sample from the model named `model_name`
        (default: the ensemble, or the one fold); the label is restricted to `choices`."""
        from vlmexp.engine.predict import predict
        from vlmexp.kfold.ensemble import vote

        tables = []
        with self._lock:
            for model, adapter in (self._models[k] for k in self.models[model_name or self.name]):
                if adapter is not None:
                    model.set_adapter(adapter)
                    if self.cfg.model.head == "cls":
                        from vlmexp.engine.cls_head import attach

                        attach(model, self._heads[adapter])
                tables.append(predict(self.cfg, model, self.processor, [sample], self.labels, progress=False))
        first = tables[0].iloc[0]
        raw = str(first["raw"]) if "raw" in tables[0] and pd.notna(first["raw"]) else ""
        if all(pd.isna(t["pred"].iloc[0]) for t in tables):  # generation named no label in any fold
            return raw, {label: 0.0 for label in self.labels}
        table = tables[0] if len(tables) == 1 else vote(tables, self.labels, how=self.cfg.ensemble.vote)
        p, pred = probs(table, self.labels)[0], str(table["pred"].iloc[0])
        if choices is not None and set(choices) != set(self.labels):
            keep = np.array([label in choices for label in self.labels])
            p = np.where(keep, p, 0.0)
            p = p / p.sum() if p.sum() > 0 else keep / keep.sum()
            pred = pred if pred in choices else self.labels[int(np.argmax(p))]
        return self._content(pred, raw), dict(zip(self.labels, map(float, p), strict=True))

    def _content(self, label: str, raw: str) -> str:
        """The label alone, or for reason/CoT prompts the reasoning, the marker and the label."""
        if not self.marker:
            return label
        cut = raw.find(self.marker.rstrip())
        reason = (raw[:cut] if cut >= 0 else raw).rstrip()
        return f"{reason}\n{self.marker}{label}" if reason else f"{self.marker}{label}"


def completion(body: dict, predictor: RunPredictor, max_pixels: int = MAX_PIXELS) -> dict:
    model = body.get("model")
    if model not in predictor.models:
        # OpenAI and vLLM answer an unknown model with 404 model_not_found; so do we.
        raise RequestError(
            f"model {model!r} does not exist; this server hosts {', '.join(map(repr, predictor.models))}",
            HTTPStatus.NOT_FOUND,
            param="model",
        )
    if body.get("stream"):
        raise RequestError("stream=true is not supported; ask without streaming", param="stream")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported: the answer is deterministic", param="n")
    choices = requested_choices(body, predictor.labels)
    sample = request_sample(body, predictor.cfg, predictor.marker, max_pixels)
    content, p = predictor.answer(sample, choices, model)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        PROBS_FIELD: p,
    }
