"""The run folder: safe names, --force only on run folders, one run finder, no empty folders left."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlmexp.config import ConfigError, load_config
from vlmexp.rundir import RunDir, RunNotFound, find_run


def _cfg(tmp_path: Path, *extra: str):
    return load_config([f"runs_dir={tmp_path / 'project' / 'runs'}", *extra])


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "a\\b", "  ", " x"])
def test_run_name_that_is_not_one_plain_folder_is_refused(tmp_path, name):
    cfg = dataclasses.replace(_cfg(tmp_path), name=name)
    with pytest.raises(ConfigError, match="not one plain folder name"):
        RunDir.for_config(cfg)


def test_force_with_name_dotdot_deletes_nothing(tmp_path):
    from vlmexp.recipe import run_once

    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    (project / "train.py").write_text("precious")
    with pytest.raises(ConfigError, match="not one plain folder name"):
        run_once(_cfg(tmp_path, "name=.."), force=True)
    assert (project / "train.py").read_text() == "precious"


def test_force_refuses_a_folder_that_is_not_a_run(tmp_path):
    cfg = _cfg(tmp_path, "name=data")
    folder = Path(cfg.runs_dir) / "data"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("image,label\n")
    with pytest.raises(ConfigError, match="not a vlmexp run"):
        RunDir.for_config(cfg).start(cfg, {}, force=True)
    assert (folder / "train.csv").exists()


def test_force_redoes_a_run_folder(tmp_path):
    cfg = _cfg(tmp_path, "name=mine")
    run = RunDir.for_config(cfg)
    run.start(cfg, {"baseline.jinja": "x"})
    (run.fold_dir(0)).mkdir(parents=True)
    run.mark_fold_done(0, {"fold": 0})
    run.start(cfg, {"baseline.jinja": "x"}, force=True)
    assert run.is_run and not run.fold_done(0)


def _finished(root: Path, cv: bool = True) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("folds: 2\n")
    if cv:
        (root / "cv.json").write_text("{}")
    return root


def test_find_run_by_path_from_anywhere_and_by_name(tmp_path, monkeypatch):
    root = _finished(tmp_path / "elsewhere" / "runs" / "r1")
    monkeypatch.chdir(tmp_path)
    assert find_run(root, runs_dir="runs").root == root  # a folder path, whatever runs_dir says
    assert find_run("r1", runs_dir=tmp_path / "elsewhere" / "runs").root == root


def test_find_run_says_not_found_and_not_finished(tmp_path):
    _finished(tmp_path / "runs" / "half", cv=False)
    with pytest.raises(RunNotFound, match="has not finished"):
        find_run("half", tmp_path / "runs")
    assert find_run("half", tmp_path / "runs", finished=False).root.name == "half"
    with pytest.raises(RunNotFound, match="no run 'nope'.*runs_dir=DIR"):
        find_run("nope", tmp_path / "runs")


def test_failed_run_leaves_no_empty_folder(tmp_path):
    from vlmexp.data import DataError
    from vlmexp.recipe import run_once

    cfg = _cfg(tmp_path, "name=typo", f"data.dir={tmp_path / 'no_such_data'}")
    with pytest.raises((DataError, FileNotFoundError)):
        run_once(cfg)
    assert not (Path(cfg.runs_dir) / "typo").exists()


def test_failed_resume_keeps_a_folder_with_results(tmp_path):
    from vlmexp.data import DataError
    from vlmexp.recipe import run_once

    cfg = _cfg(tmp_path, "name=kept", f"data.dir={tmp_path / 'no_such_data'}")
    run = RunDir.for_config(cfg)
    run.start(cfg, {})
    run.mark_fold_done(0, {"fold": 0})
    with pytest.raises((DataError, FileNotFoundError)):
        run_once(cfg)
    assert run.fold_done(0)


def test_a_fold_checkpoint_counts_as_a_result(tmp_path):
    cfg = _cfg(tmp_path, "name=ckpt")
    run = RunDir.for_config(cfg)
    run.start(cfg, {})
    (run.fold_dir(0) / "class_counts.json").parent.mkdir(parents=True)
    (run.fold_dir(0) / "class_counts.json").write_text("{}")
    assert not run.holds_results()
    (run.fold_dir(0) / "checkpoints" / "last").mkdir(parents=True)
    (run.fold_dir(0) / "checkpoints" / "last" / "optimizer.pt").write_bytes(b"x")
    assert run.holds_results() and not run.discard_if_empty() and run.root.exists()
