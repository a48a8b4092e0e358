"""`exp ensemble RUN_A RUN_B`: mean test probabilities, CV from the mean of the OOF tables, a submission,
and clear refusals when the runs do not fit together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmexp.cli import app
from vlmexp.config import load_config
from vlmexp.kfold.combine import EnsembleError, ensemble_runs
from vlmexp.rundir import RunDir
from vlmexp.tables import prob_columns, read_json, read_table, write_json, write_table

LABELS = ["a", "b"]
TRAIN_IDS = [f"r{i}" for i in range(8)]
GOLD = ["a", "a", "a", "a", "b", "b", "b", "b"]
TEST_IDS = ["t0", "t1", "t2"]


@pytest.fixture
def comp(tmp_path) -> Path:
    root = tmp_path / "comp"
    (root / "img").mkdir(parents=True)
    (root / "labels.json").write_text(json.dumps({x: f"class {x}" for x in LABELS}))
    for i in TRAIN_IDS + TEST_IDS:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "img" / f"{i}.png")
    pd.DataFrame({"id": TRAIN_IDS, "image": [f"img/{i}.png" for i in TRAIN_IDS], "label": GOLD}).to_csv(
        root / "train.csv", index=False
    )
    pd.DataFrame({"id": TEST_IDS, "image": [f"img/{i}.png" for i in TEST_IDS]}).to_csv(
        root / "test.csv", index=False
    )
    pd.DataFrame({"id": TEST_IDS, "label": ["a", "a", "b"]}).to_csv(root / "answers.csv", index=False)
    return root


def _table(ids: list[str], p_a: list[float]) -> pd.DataFrame:
    df = pd.DataFrame({"id": ids, "pred": ["a" if p >= 0.5 else "b" for p in p_a]})
    df[prob_columns(LABELS)] = np.stack([p_a, 1 - np.array(p_a)], axis=1)
    return df


def _run(tmp_path: Path, comp: Path, name: str, oof_p_a: list[float], test_p_a: list[float]) -> RunDir:
    """A finished run as the recipe leaves it (only the files an ensemble reads)."""
    cfg = load_config(
        [
            f"name={name}",
            f"data.dir={comp}",
            f"runs_dir={tmp_path / 'runs'}",
            f"leaderboard={tmp_path / 'lb.csv'}",
            "folds=2",
            "data.answers_csv=answers.csv",
        ]
    )
    run = RunDir.for_config(cfg)
    run.start(cfg, {})
    oof = _table(TRAIN_IDS, oof_p_a)
    oof.insert(1, "label", GOLD)
    oof.insert(2, "fold", [i % 2 for i in range(8)])
    write_table(oof.iloc[::-1], run.path("oof.csv"))  # another row order than the other run on purpose
    write_table(_table(TEST_IDS, test_p_a), run.path("test_probs.csv"))
    write_json({"metric": "macro_f1", "mean": 0.5}, run.cv_path)
    return run


def test_mean_of_two_runs_scored_on_their_oof(tmp_path, comp):
    # A is right on r0-r3 only (calls everything a), B is right on r4-r7 only, but less sure: the mean
    # gets r0-r3 and r4-r7 each from the more confident run.
    a = _run(tmp_path, comp, "A", [0.9] * 4 + [0.6] * 4, [0.9, 0.2, 0.55])
    b = _run(tmp_path, comp, "B", [0.45] * 4 + [0.1] * 4, [0.7, 0.6, 0.3])
    out = RunDir(tmp_path / "runs" / "ens")
    cv = ensemble_runs([a, b], out)
    test = read_table(out.path("test_probs.csv")).set_index("id")
    assert test["p:a"].tolist() == pytest.approx([0.8, 0.4, 0.425])
    assert test["pred"].tolist() == ["a", "b", "b"]
    assert test["agree"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    oof = read_table(out.path("oof.csv")).set_index("id")
    assert oof.loc["r0", "p:a"] == pytest.approx(0.675) and oof.loc["r5", "p:a"] == pytest.approx(0.35)
    assert (oof["pred"] == oof["label"]).all() and cv["mean"] == pytest.approx(1.0)
    assert cv["members"] == ["A", "B"] and read_json(out.cv_path)["macro_f1"] == pytest.approx(1.0)
    sub = pd.read_csv(out.path("submission.csv"), dtype=str)
    assert sub["label"].tolist() == ["a", "b", "b"]
    lb = pd.read_csv(tmp_path / "lb.csv", dtype=str)
    assert lb["run"].tolist() == ["ens"] and "ensemble of A + B" in lb.loc[0, "overrides"]
    assert float(lb.loc[0, "test_accuracy"]) == pytest.approx(2 / 3, abs=1e-4)  # a a b vs a b b
    with pytest.raises(FileExistsError):
        ensemble_runs([a, b], out)
    # The ensemble is a run like any other for the ablation report (paired against a member).
    from vlmexp.report import write_report

    assert "ens" in write_report([a.root, out.root], baseline=a.root, out=tmp_path / "rep").read_text()


def test_runs_that_do_not_fit_together_are_refused(tmp_path, comp):
    a = _run(tmp_path, comp, "A", [0.9] * 8, [0.9, 0.2, 0.55])
    b = _run(tmp_path, comp, "B", [0.9] * 8, [0.9, 0.2, 0.55])
    out = RunDir(tmp_path / "runs" / "ens")
    write_table(_table(["t0", "t1", "zz"], [0.5] * 3), b.path("test_probs.csv"))
    with pytest.raises(EnsembleError, match=r"other ids.*only in B: \['zz'\]"):
        ensemble_runs([a, b], out)
    write_table(_table(TEST_IDS, [0.5] * 3).rename(columns={"p:b": "p:c"}), b.path("test_probs.csv"))
    with pytest.raises(EnsembleError, match="same labels"):
        ensemble_runs([a, b], out)
    write_table(_table(TEST_IDS, [0.5] * 3), b.path("test_probs.csv"))
    oof = read_table(b.path("oof.csv"))
    oof.loc[oof["id"] == "r1", "label"] = "b"
    write_table(oof, b.path("oof.csv"))
    with pytest.raises(EnsembleError, match=r"other gold labels.*'r1'"):
        ensemble_runs([a, b], out)
    with pytest.raises(EnsembleError, match="two or more"):
        ensemble_runs([a], out)
    assert not out.root.exists()


def test_cli_ensemble_command(tmp_path, comp):
    _run(tmp_path, comp, "A", [0.9] * 4 + [0.6] * 4, [0.9, 0.2, 0.55])
    _run(tmp_path, comp, "B", [0.45] * 4 + [0.1] * 4, [0.7, 0.6, 0.3])
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["ensemble", "A", "B", "--runs-dir", str(runs), "--calibrate", "bias"])
    assert result.exit_code == 0, result.output
    made = [p for p in runs.iterdir() if p.name.startswith("ens-")]
    assert len(made) == 1 and "calibrated" in read_json(made[0] / "cv.json")
    assert "pred_raw" in read_table(made[0] / "test_probs.csv").columns
    result = CliRunner().invoke(app, ["ensemble", "A", "nope", "--runs-dir", str(runs)])
    assert result.exit_code == 2


def test_the_ensembles_row_goes_to_the_leaderboard_it_is_told(tmp_path, comp):
    """`exp ensemble A B leaderboard=...` once wrote to the first member's leaderboard instead."""
    a = _run(tmp_path, comp, "A", [0.9] * 8, [0.9, 0.2, 0.55])
    b = _run(tmp_path, comp, "B", [0.8] * 8, [0.7, 0.6, 0.3])
    mine = tmp_path / "mine" / "lb.csv"
    ensemble_runs([a, b], RunDir(tmp_path / "runs" / "ens"), leaderboard=mine)
    assert pd.read_csv(mine, dtype=str)["run"].tolist() == ["ens"]
    assert not (tmp_path / "lb.csv").exists()
