"""Tracking: per-fold TensorBoard runs with the real validation metrics, log.jsonl, tracker grouping."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.engine.train import FoldOutputs, _tracker_env
from vlmexp.rundir import RunDir
from vlmexp.tables import read_json


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from vlmexp.recipe import run_experiment

    d = tmp_path_factory.mktemp("tracking")
    make_demo(d / "data", seed=0, n_train=24, n_test=12)
    cfg = load_config(
        [
            "folds=2",
            "train.epochs=2",
            "train.batch_size=4",
            "train.lr=5e-3",
            "train.logging_steps=1",
            "predict.batch_size=16",
            f"data.dir={d / 'data'}",
            f"runs_dir={d / 'runs'}",
            f"model.cache_dir={d / 'tiny'}",
            f"leaderboard={d / 'leaderboard.csv'}",
            "name=tracked",
        ]
    )
    return run_experiment(cfg).root


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_holds_every_folds_validation_macro_f1_per_epoch(run):
    from tensorboard.util import tensor_util

    for k in (0, 1):
        acc = _events(RunDir(run).tensorboard_dir(k))
        f1 = acc.Scalars("eval/macro_f1")
        acc_ = acc.Scalars("eval/accuracy")
        # 12 training rows at batch 4: 3 steps an epoch, validated after steps 3 and 6.
        assert [e.step for e in f1] == [e.step for e in acc_] == [3, 6], k
        assert all(0.0 <= e.value <= 1.0 for e in f1 + acc_)
        # The real metric: the best epoch's validation macro-F1 is the fold's OOF macro-F1 (the OOF rows
        # are the validation rows, predicted by the adapter of the best epoch).
        oof_f1 = read_json(run / f"folds/fold{k}/metrics.json")["macro_f1"]
        assert max(e.value for e in f1) == pytest.approx(oof_f1, abs=1e-6)
        assert len(acc.Scalars("train/loss")) == 6
        # One tracker run per fold, named <run>-fold<k>.
        args = json.loads(tensor_util.make_ndarray(acc.Tensors("args/text_summary")[0].tensor_proto)[0])
        assert args["run_name"] == f"tracked-fold{k}"


@pytest.mark.slow
def test_log_jsonl_has_one_line_per_trainer_log(run):
    lines = [json.loads(x) for x in (run / "folds/fold0/log.jsonl").read_text().splitlines()]
    train = [e for e in lines if "loss" in e]
    evals = [e for e in lines if "eval_macro_f1" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert all("lr" in e and "epoch" in e for e in train) and max(e["lr"] for e in train) > 0
    assert [(e["step"], e["epoch"]) for e in evals] == [(3, 1.0), (6, 2.0)]
    assert {"eval_accuracy", "eval_best"} <= set(evals[0])
    assert lines[-1]["step"] == 6 and "train_runtime" in lines[-1]


def test_wandb_groups_a_runs_folds_and_finishes_each(monkeypatch, tmp_path):
    cfg = load_config(["train.report_to=wandb"])
    out = FoldOutputs.under(tmp_path / "demo-1a2b" / "demo-1a2b-fold0")
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    with _tracker_env(cfg, out):
        assert os.environ["WANDB_RUN_GROUP"] == "demo-1a2b"
    # Unset again for the next run; the fold's wandb run finished, so the next fold starts its own.
    assert "WANDB_RUN_GROUP" not in os.environ and finished == [True]
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")  # the user's own grouping wins
    with _tracker_env(cfg, out):
        assert os.environ["WANDB_RUN_GROUP"] == "mine"
    assert os.environ["WANDB_RUN_GROUP"] == "mine"


def test_mlflow_tags_the_fold_run_with_its_run(monkeypatch, tmp_path):
    cfg = load_config(["train.report_to=mlflow"])
    out = FoldOutputs.under(tmp_path / "demo-1a2b" / "demo-1a2b-fold1")
    monkeypatch.delenv("MLFLOW_TAGS", raising=False)
    with _tracker_env(cfg, out):
        tags = json.loads(os.environ["MLFLOW_TAGS"])
    assert tags == {"vlmexp.run": "demo-1a2b", "vlmexp.fold_run": "demo-1a2b-fold1"}
    assert "MLFLOW_TAGS" not in os.environ


def test_log_jsonl_of_a_resumed_fold_drops_what_the_killed_process_logged_after_its_checkpoint(tmp_path):
    from transformers import TrainerState

    from vlmexp.engine.callbacks import JsonlLog

    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.4}\n'
        '{"step": 2, "train_runtime": 9.0}\n{"step": 4, "lo'  # a line cut by kill -9
    )
    state = TrainerState(global_step=2)  # resumed from checkpoint-2
    log = JsonlLog(path)
    log.on_train_begin(None, state, None)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
    ]
    state.global_step, state.epoch = 3, 0.75
    log.on_log(None, state, None, logs={"loss": 1.3, "learning_rate": 1e-3})
    last = json.loads(path.read_text().splitlines()[-1])
    assert last == {"step": 3, "loss": 1.3, "lr": 1e-3, "epoch": 0.75}
    # The other ranks of a sharded fold log the same lines: only rank 0 writes them.
    state.is_world_process_zero = False
    log.on_log(None, state, None, logs={"loss": 1.2})
    assert len(path.read_text().splitlines()) == 3
