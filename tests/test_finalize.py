"""finalize on hand-written fold tables (no model): a lost leaderboard row, useless-run flags, data."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from vlmexp import leaderboard
from vlmexp.config import load_config
from vlmexp.tables import read_json

LABELS = ["a", "b", "c"]
GOLD = ["a"] * 6 + ["b"] * 3 + ["c"] * 3


@pytest.fixture
def experiment(tmp_path: Path, finished_folds):
    """experiment(preds, name): a run whose 2 folds are 'finished' with the given OOF predictions."""

    def make(preds: list[str], name: str = "r"):
        cfg = load_config(
            [
                "folds=2",
                f"name={name}",
                f"runs_dir={tmp_path / 'runs'}",
                f"leaderboard={tmp_path / 'lb.csv'}",
                f"data.dir={tmp_path / 'comp'}",
            ]
        )
        prov = {"data_fingerprint": {"digest": "3f9a1c2b7d4e"}}
        return finished_folds(cfg, LABELS, GOLD, preds, ["a", "b"], prov=prov)

    return make


def test_row_lost_between_cv_json_and_append_is_added_once_by_the_rerun(tmp_path, monkeypatch, experiment):
    from vlmexp.recipe import finalize, run_once

    exp = experiment(GOLD)
    real_append, calls = leaderboard.append, []

    def dies_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed while waiting on the leaderboard lock")
        return real_append(*args, **kwargs)

    monkeypatch.setattr(leaderboard, "append", dies_once)
    with pytest.raises(KeyboardInterrupt):
        finalize(exp, started=0.0)
    assert exp.run.finished and not (tmp_path / "lb.csv").exists()

    run_once(exp.cfg)  # finds cv.json: reuses the run, and appends the missing row
    run_once(exp.cfg)  # the row is there now: nothing more
    board = leaderboard.load(tmp_path / "lb.csv")
    assert board["run"].tolist() == ["r"]
    assert board["config_hash"].tolist() == [read_json(exp.run.cv_path)["config_hash"]]


def test_one_class_run_is_flagged_in_log_cv_json_and_leaderboard(tmp_path, caplog, experiment):
    from vlmexp.recipe import finalize

    exp = experiment(["a"] * 12)
    with caplog.at_level(logging.WARNING, logger="vlmexp"):
        finalize(exp, started=0.0)
    cv = read_json(exp.run.cv_path)
    assert cv["flag"] == "one_class near_majority"
    assert cv["majority_macro_f1"] == pytest.approx(cv["mean"]) and "majority_baseline" not in cv
    assert "looks useless" in caplog.text and "ocr.enabled=true" in caplog.text
    row = leaderboard.load(tmp_path / "lb.csv").iloc[0]
    assert row["flag"] == "one_class near_majority"
    assert row["majority_macro_f1"] == pytest.approx(round(cv["majority_macro_f1"], 4))
    assert row["data"] == str(tmp_path / "comp") and row["data_fingerprint"] == "3f9a1c2b7d4e"


def test_good_run_is_not_flagged(tmp_path, caplog, experiment):
    from vlmexp.recipe import finalize

    exp = experiment(GOLD)
    with caplog.at_level(logging.WARNING, logger="vlmexp"):
        finalize(exp, started=0.0)
    assert read_json(exp.run.cv_path)["flag"] == ""
    assert "looks useless" not in caplog.text
    assert pd.isna(leaderboard.load(tmp_path / "lb.csv").iloc[0]["flag"])


def test_near_majority_rule_uses_fold_std_and_a_minimum_margin():
    from vlmexp.sanity import run_flags

    assert run_flags(0.30, 0.05, 0.26, ["a", "b"]) == ["near_majority"]  # margin 0.04 < std 0.05
    assert run_flags(0.45, 0.03, 0.26, ["a", "b"]) == []
    assert run_flags(0.275, 0.001, 0.26, ["a", "b"]) == ["near_majority"]  # margin 0.015 < 0.02
    assert run_flags(0.0184, 0.0002, 0.0185, ["a", "a"]) == ["one_class", "near_majority"]
