"""Locked leaderboard appends, column unions, Markdown."""

from __future__ import annotations

import multiprocessing as mp

import pandas as pd

from vlmexp.leaderboard import append, load, to_markdown, write_markdown


def _row(run: str, cv: float, **extra) -> dict:
    return {
        "run": run,
        "config_hash": "00001234",
        "metric": "macro_f1",
        "cv_mean": cv,
        "cv_std": 0.01,
        "fold_scores": [cv, cv],
        **extra,
    }


def _writer(path: str, proc: int, n: int) -> None:
    for i in range(n):
        # process 1 adds a column halfway, forcing rewrites while the others append
        extra = {"note": f"p{proc},{i}|x"} if proc == 1 and i >= n // 2 else {}
        append(_row(f"p{proc}-r{i}", 0.5 + proc / 10 + i / 1000, **extra), path)


def test_concurrent_appends(tmp_path):
    path = tmp_path / "lb.csv"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), p, 20)) for p in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    df = load(path)
    assert len(df) == 60
    assert sorted(df["run"]) == sorted(f"p{p}-r{i}" for p in range(3) for i in range(20))
    assert df["cv_mean"].dtype.kind == "f" and df["cv_mean"].notna().all()
    assert (df["config_hash"] == "00001234").all()  # stays text
    notes = df.set_index("run")["note"]
    assert notes["p1-r19"] == "p1,19|x" and pd.isna(notes["p0-r0"])


def test_new_column_rewrites_without_shifting(tmp_path):
    path = tmp_path / "lb.csv"
    append(_row("a", 0.7), path)
    append(_row("b", 0.9, pseudo_round=1, brand_new="yes"), path)
    append(_row("c", 0.8), path)
    df = load(path).set_index("run")
    assert df.loc["a", "cv_mean"] == 0.7 and df.loc["b", "brand_new"] == "yes"
    assert pd.isna(df.loc["c", "brand_new"])
    assert df.loc["a", "fold_scores"] == "[0.7, 0.7]"


def test_markdown_sorted(tmp_path):
    path = tmp_path / "lb.csv"
    for run, cv in [("mid", 0.8), ("best", 0.9), ("worst", 0.1)]:
        append(_row(run, cv), path)
    append({**_row("acc-run", 0.99), "metric": "accuracy"}, path)
    md = to_markdown(load(path), metric="macro_f1")
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "run" not in ln.split("|")[2]]
    assert [ln.split("|")[2].strip() for ln in lines] == ["best", "mid", "worst"]
    assert "acc-run" not in md and "0.9000" in md
    top1 = to_markdown(load(path), metric="macro_f1", top=1)
    assert "best" in top1 and "mid" not in top1
    out = write_markdown(path, tmp_path / "lb.md")
    assert "acc-run" in out.read_text() and "best" in out.read_text()


def test_file_without_final_newline_keeps_rows_apart(tmp_path):
    path = tmp_path / "lb.csv"
    append(_row("a", 0.7), path)
    path.write_text(path.read_text().rstrip("\n"))  # saved by an editor that drops the last newline
    append(_row("b", 0.8), path)
    assert load(path)["run"].tolist() == ["a", "b"]


def test_symlinked_leaderboard_is_written_through(tmp_path):
    shared = tmp_path / "shared" / "lb.csv"
    append(_row("a", 0.7), shared)
    link = tmp_path / "lb.csv"
    link.symlink_to(shared)
    append(_row("b", 0.8, brand_new="x"), link)  # a new column: the whole file is rewritten
    assert link.is_symlink()
    assert load(shared)["run"].tolist() == ["a", "b"]


def test_files_get_the_users_umask_not_0600(tmp_path):
    import os

    from vlmexp.tables import write_json

    old = os.umask(0o022)
    try:
        append(_row("a", 0.7), tmp_path / "lb.csv")
        write_json({"x": 1}, tmp_path / "cv.json")
    finally:
        os.umask(old)
    assert (tmp_path / "lb.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "cv.json").stat().st_mode & 0o777 == 0o644


def test_unique_append_skips_a_row_already_there(tmp_path):
    path = tmp_path / "lb.csv"
    assert append(_row("a", 0.7), path, unique=True)
    assert not append(_row("a", 0.7), path, unique=True)
    assert append({**_row("a", 0.7), "config_hash": "99999999"}, path, unique=True)  # another config
    assert load(path)["config_hash"].tolist() == ["00001234", "99999999"]


def test_old_majority_baseline_column_loads_under_its_metric(tmp_path):
    path = tmp_path / "lb.csv"
    path.write_text(
        "run,metric,cv_mean,majority_baseline,test_majority_baseline\n"
        "old-f1,macro_f1,0.5,0.02,0.03\nold-acc,accuracy,0.6,0.3,\n"
    )
    append({**_row("new", 0.7), "majority_macro_f1": 0.1}, path)
    df = load(path).set_index("run")
    assert "majority_baseline" not in df.columns
    assert df.loc["old-f1", "majority_macro_f1"] == 0.02 and df.loc["new", "majority_macro_f1"] == 0.1
    assert df.loc["old-acc", "majority_accuracy"] == 0.3 and pd.isna(df.loc["old-f1", "majority_accuracy"])
    assert df.loc["old-f1", "test_majority_macro_f1"] == 0.03
    assert "majority_macro_f1" in to_markdown(df.reset_index())


def test_markdown_shows_one_competition(tmp_path):
    path = tmp_path / "lb.csv"
    append(_row("mine", 0.7, data=str(tmp_path / "comp_a")), path)
    append(_row("theirs", 0.9, data="comp_b"), path)
    md = to_markdown(load(path), data=tmp_path / "comp_a")
    assert "mine" in md and "theirs" not in md and "1 run on other competitions" in md
    both = to_markdown(load(path))
    assert "mine" in both and "theirs" in both


def test_markdown_of_a_competition_without_runs_says_so(tmp_path):
    path = tmp_path / "lb.csv"
    append(_row("theirs", 0.9, data="comp_b"), path)
    md = to_markdown(load(path), data="comp_a")
    assert "_no runs on comp_a yet_" in md and "1 run on other competitions" in md


def test_rows_from_before_the_data_column_get_their_data_dir(tmp_path):
    path = tmp_path / "lb.csv"
    path.write_text(
        "run,overrides,metric,cv_mean\n"
        "d,folds=3 ocr.enabled=True,macro_f1,0.5\n"
        "m,folds=3 data.dir=mycomp,macro_f1,0.6\n"
    )
    assert load(path).set_index("run")["data"].to_dict() == {"d": "demo_data", "m": "mycomp"}
    md = to_markdown(load(path), data="demo_data")
    assert "| d " in md and "| m " not in md


def test_counts_stay_whole_numbers_beside_rows_that_lack_them(tmp_path):
    # an `exp ensemble` row has no train_size: the column must not turn 400 into "400.0000"
    path = tmp_path / "lb.csv"
    append(_row("solo", 0.7, train_size=400, pseudo_count=12), path)
    append(_row("ens-1", 0.8), path)
    df = load(path).set_index("run")
    assert df.loc["solo", "train_size"] == 400 and pd.isna(df.loc["ens-1", "train_size"])
    row = next(ln for ln in to_markdown(load(path)).splitlines() if "| solo |" in ln)
    cells = [c.strip() for c in row.split("|")]
    assert "400" in cells and "12" in cells and "400.0000" not in row


def test_the_table_shows_each_cvs_provenance_and_seconds_plainly(tmp_path):
    """fold_scores and config_hash were in the CSV but not in the printed table; duration 28.3000."""
    path = tmp_path / "lb.csv"
    append({**_row("a", 0.7), "config_hash": "3f9a1c2b", "git_sha": "090e7e86", "duration_s": 28.3}, path)
    append(_row("ens", 0.8), path)  # no duration: an empty cell, not "nan"
    md = to_markdown(load(path))
    header = next(ln for ln in md.splitlines() if "| run |" in ln)
    assert all(c in header for c in ("fold_scores", "config_hash", "git_sha"))
    row = next(ln for ln in md.splitlines() if "| a |" in ln)
    assert "3f9a1c2b" in row and "| 28.3 |" in row and "28.3000" not in row and "nan" not in md
