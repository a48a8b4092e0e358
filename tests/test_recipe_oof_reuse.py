"""The kept epoch's validation table is the fold's OOF table: no second prediction of the same rows
with the same weights, and the table equals what that fold's saved adapter predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.tables import prob_columns, read_json, read_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=32, n_test=12)


def _cfg(demo: Path, work: Path, *extra: str):
    return load_config(
        [
            "folds=2",
            "train.epochs=2",
            "train.eval=true",
            "train.batch_size=8",
            "predict.batch_size=8",
            # A rate that moves predictions between epochs, so the wrong epoch's table would differ.
            "train.lr=5e-3",
            f"data.dir={demo}",
            f"runs_dir={work / 'runs'}",
            f"model.cache_dir={work / 'tiny'}",
            f"leaderboard={work / 'lb.csv'}",
            *extra,
        ]
    )


def _predicted_ids(monkeypatch) -> list[set[str]]:
    """The ids of every recipe-level prediction call (OOF and test), in order."""
    import vlmexp.recipe as recipe

    calls: list[set[str]] = []
    real = recipe._predict

    def counting(cfg, model, processor, samples, *a, **kw):
        calls.append({s["id"] for s in samples})
        return real(cfg, model, processor, samples, *a, **kw)

    monkeypatch.setattr(recipe, "_predict", counting)
    return calls


def test_oof_is_the_kept_validation_not_a_second_prediction(demo, tmp_path, monkeypatch):
    from vlmexp.models.load import load_for_inference
    from vlmexp.recipe import _predict, prepare, run_experiment, split_with_pseudo

    calls = _predicted_ids(monkeypatch)
    cfg = _cfg(demo, tmp_path)
    run = run_experiment(cfg)
    oof = read_table(run.path("oof.csv"))
    train_ids = set(oof["id"])
    assert calls and all(not (ids & train_ids) for ids in calls), "validation rows predicted again"

    exp = prepare(cfg)
    labels = exp.labels
    for k in range(cfg.folds):
        fold = read_table(run.fold_dir(k) / "oof.csv")
        _, val_split = split_with_pseudo(exp.train_all, exp.folds, k)
        model = load_for_inference(cfg, run.adapter_dir(k))
        again = _predict(cfg, model, exp.processor, exp.samples(val_split, False), labels)
        assert list(fold["id"]) == list(again["id"])
        np.testing.assert_allclose(fold[prob_columns(labels)], again[prob_columns(labels)], atol=1e-5)
        assert list(fold["pred"]) == list(again["pred"])
        metrics = read_json(run.fold_dir(k) / "metrics.json")
        assert metrics["best_epoch"] in (1.0, 2.0)
        assert (metrics["batch_size"], metrics["lr"]) == (8, 5e-3)  # as trained, for provenance


def test_tta_still_predicts_the_oof_rows(demo, tmp_path, monkeypatch):
    calls = _predicted_ids(monkeypatch)
    from vlmexp.recipe import run_experiment

    run = run_experiment(_cfg(demo, tmp_path, "predict.tta=scales", "folds=2", "train.epochs=1"))
    train_ids = set(read_table(run.path("oof.csv"))["id"])
    assert any(ids <= train_ids for ids in calls), "TTA's OOF views must be predicted, not the plain table"
