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


def _finished_folder(tmp_path: Path, *extra: str):
    """A finished run folder (provenance, config, cv.json) of a config on a small demo, no training."""
    from vlmexp.demo import make_demo
    from vlmexp.fingerprint import competition_fingerprint
    from vlmexp.tables import write_json

    data = make_demo(tmp_path / "data", seed=1, n_train=24, n_test=12)
    cfg = _cfg(tmp_path, f"data.dir={data}", f"leaderboard={tmp_path / 'lb.csv'}", *extra)
    run = RunDir.for_config(cfg)
    run.start(cfg, {}, fingerprint=competition_fingerprint(cfg.data))
    write_json({"metric": "macro_f1", "mean": 0.5}, run.cv_path)
    return cfg, run, data


def test_a_finished_run_is_reused_only_for_its_own_config_and_data(tmp_path):
    """`name=smoke` rerun with other settings once handed back the old run's numbers as if they were
    the new config's; edited data likewise. Both are refused now, as for an unfinished folder."""
    from vlmexp.recipe import run_once

    cfg, run, data = _finished_folder(tmp_path, "name=smoke", "train.epochs=2")
    assert run_once(cfg).root == run.root  # the same config on the same data: reused as it is
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1.0))
    with pytest.raises(ConfigError, match="holds config"):
        run_once(other)
    with (data / "train.csv").open("a", encoding="utf-8") as f:
        f.write("images/train_0001.png,invoice,extra row\n")
    with pytest.raises(ConfigError, match="other data"):
        run_once(cfg)
    assert run.cv_path.exists()  # refused: nothing removed


def test_git_sha_is_the_code_checkouts_not_the_current_folders(tmp_path, monkeypatch):
    import subprocess

    from vlmexp.rundir import git_state

    repo = tmp_path / "elsewhere"
    repo.mkdir()
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True)
    other = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    monkeypatch.chdir(repo)
    sha = git_state()["sha"]
    assert sha != other.strip()
    code = Path(__file__).resolve().parents[1] / "vlmexp"
    here = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True)
    assert sha == (here.stdout.strip() if here.returncode == 0 else "unknown")
    assert git_state(repo)["sha"] == other.strip()  # a folder asked for by name: its own repository
