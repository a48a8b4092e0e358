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
