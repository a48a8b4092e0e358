"""End to end: `exp run` on a small demo with a tiny model, resume after kill -9, concurrent runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.tables import prob_columns, read_json, read_table

pytestmark = pytest.mark.slow

# Small and fast: 2 folds, one short epoch; enough to exercise every stage.
FAST = [
    "folds=2",
    "train.epochs=1",
    "train.eval=false",
    "train.batch_size=8",
    "predict.batch_size=16",
    "data.limit=0",
    "train.logging_steps=1",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=48, n_test=16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


def overrides(demo: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        *FAST,
        f"data.dir={demo}",
        f"runs_dir={workdir / 'runs'}",
        f"model.cache_dir={workdir / 'tiny'}",
        f"leaderboard={workdir / 'leaderboard.csv'}",
        *extra,
    ]


def exp(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vlmexp.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def finished_run(demo, workdir) -> Path:
    from vlmexp.recipe import run_experiment

    return run_experiment(load_config(overrides(demo, workdir, "name=ref"))).root


def test_every_training_row_predicted_once_out_of_fold(finished_run, demo):
    oof = read_table(finished_run / "oof.csv")
    train = pd.read_csv(demo / "train.csv")
    assert len(oof) == len(train) and oof["id"].is_unique
    assert set(oof["fold"]) == {0, 1}
    labels = list(read_json(demo / "labels.json"))
    p = oof[prob_columns(labels)].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-4)


def test_run_folder_holds_provenance_and_outputs(finished_run):
    for name in (
        "config.yaml",
        "overrides.json",
        "prompt/baseline.jinja",
        "provenance.json",
        "oof.csv",
        "test_probs.csv",
        "cv.json",
        "per_class.csv",
        "confusion.csv",
        "submission.csv",
        "disagreements.csv",
        "suspect_labels.csv",
        "folds/fold0/adapter",
        "folds/fold1/metrics.json",
    ):
        assert (finished_run / name).exists(), name
    cv = read_json(finished_run / "cv.json")
    assert len(cv["folds"]) == 2 and cv["config_hash"] and cv["git_sha"]
    prov = read_json(finished_run / "provenance.json")
    assert prov["config_hash"] == cv["config_hash"] and "torch" in prov["versions"]


def test_rerun_skips_finished_folds(finished_run, demo, workdir):
    from vlmexp.recipe import run_experiment

    before = (finished_run / "folds/fold0/oof.csv").stat().st_mtime_ns
    rows = len(pd.read_csv(workdir / "leaderboard.csv"))
    cv = (finished_run / "cv.json").read_bytes()
    t0 = time.time()
    run_experiment(load_config(overrides(demo, workdir, "name=ref")))
    assert (finished_run / "folds/fold0/oof.csv").stat().st_mtime_ns == before
    # A finished run is reused as it is: no second leaderboard row, cv.json untouched.
    assert len(pd.read_csv(workdir / "leaderboard.csv")) == rows
    assert (finished_run / "cv.json").read_bytes() == cv
    assert time.time() - t0 < 60


def test_resume_after_kill_mid_fold_equals_uninterrupted(finished_run, demo, workdir):
    args = ["run", *overrides(demo, workdir, "name=killed")]
    proc = exp(*args, cwd=workdir)
    fold1 = workdir / "runs" / "killed" / "folds" / "fold1"
    deadline = time.time() + 240
    # Kill -9 once fold 0 is done and fold 1 has started writing: the worst moment to die.
    while not (fold1 / "class_counts.json").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "fold 1 never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (fold1 / "done.json").exists()
    assert (workdir / "runs" / "killed" / "folds" / "fold0" / "done.json").exists()

    resumed = exp(*args, cwd=workdir)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    killed = workdir / "runs" / "killed"
    for table in ("oof.csv", "test_probs.csv"):
        a, b = read_table(finished_run / table), read_table(killed / table)
        assert a["pred"].tolist() == b["pred"].tolist(), table
        num = [c for c in a.columns if c.startswith("p:")]
        np.testing.assert_allclose(a[num].to_numpy(), b[num].to_numpy(), atol=1e-5)


def test_two_concurrent_runs_both_land_on_leaderboard(demo, workdir):
    procs = [
        exp("run", *overrides(demo, workdir, f"name=conc{i}", f"seed={i}"), cwd=workdir) for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out
    board = pd.read_csv(workdir / "leaderboard.csv")
    assert {"conc0", "conc1"} <= set(board["run"])


def test_folds_in_parallel_through_torchrun_equal_sequential(finished_run, demo, workdir):
    # gpus=2 on a CPU machine still starts two torchrun workers, each training its own folds.
    p = exp("run", *overrides(demo, workdir, "name=parallel", "gpus=2"), cwd=workdir)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out
    a, b = read_table(finished_run / "oof.csv"), read_table(workdir / "runs" / "parallel" / "oof.csv")
    assert a["pred"].tolist() == b["pred"].tolist()
    num = [c for c in a.columns if c.startswith("p:")]
    np.testing.assert_allclose(a[num].to_numpy(), b[num].to_numpy(), atol=1e-5)


def test_cli_reports_unknown_key_without_traceback(workdir):
    p = exp("run", "promt=label_desc", cwd=workdir)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "did you mean 'prompt'" in out and "Traceback" not in out
