"""Every file and column a run will read besides the competition tables, checked before fold 0.

A run once trained every fold and then died on `data.answers_csv=test_answers.csv` that the data
folder did not have: 40 minutes lost. These checks add to the competition's own (`data._inspect`),
so `data.preflight(cfg)` and `exp data check DIR key=value...` list every problem at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from vlmexp.config import Config
from vlmexp.data import CheckResult
from vlmexp.data_check import _check_labels, _read_csv


def check_run_files(cfg: Config, out: CheckResult, labels: dict | None, test: pd.DataFrame | None) -> None:
    """Add a problem for every file or column of `cfg` that the run would fail on later."""
    if cfg.data.answers_csv:
        _answers(cfg, out, labels, test)
    if cfg.train.mix_dataset and cfg.train.mix_ratio > 0:
        _mix_dataset(Path(cfg.train.mix_dataset), out)
    if cfg.ocr.enabled:
        _writable_folder(Path(cfg.ocr.cache_dir), "ocr.cache_dir", out)
    if cfg.prompts.dir and not Path(cfg.prompts.dir).is_dir():
        out.add(cfg.prompts.dir, None, "prompts.dir is not a folder", "create it or clear prompts.dir=")
    runs = Path(cfg.runs_dir)
    if cfg.pseudo.source:
        folder = _finished_run(cfg.pseudo.source, runs, "test_probs.csv", "pseudo.source", out)
        _same_test_set(folder, "pseudo.source", labels, test, cfg.data.id_col, out)
    if cfg.ensemble.suspects != "keep":
        _finished_run(cfg.ensemble.suspects_from, runs, "suspect_labels.csv", "ensemble.suspects_from", out)
    if cfg.ensemble.reconcile == "rerun":
        folder = _finished_run(cfg.ensemble.rerun_from, runs, "test_probs.csv", "ensemble.rerun_from", out)
        _same_test_set(folder, "ensemble.rerun_from", labels, test, cfg.data.id_col, out)


def _same_test_set(
    folder: Path | None,
    key: str,
    labels: dict | None,
    test: pd.DataFrame | None,
    id_col: str,
    out: CheckResult,
) -> None:
    """A source run's test_probs.csv made on this competition: a probability column for every label and
    ids of this test set. A run of another competition failed mid-start with a traceback instead."""
    if folder is None or labels is None:
        return
    from vlmexp.tables import prob_columns, read_table

    table = read_table(folder / "test_probs.csv")
    lacking = [c.removeprefix("p:") for c in prob_columns(list(labels)) if c not in table.columns]
    fix = f"name a finished run of this competition (same labels.json and test.csv) as {key}"
    if lacking:
        msg = f"run {folder} was made with other labels: its test_probs.csv has no {', '.join(lacking[:5])}"
        out.add(key, None, msg + ("..." if len(lacking) > 5 else ""), fix)
    elif test is not None and id_col in test.columns and "id" in table.columns:
        if not set(table["id"].astype(str)) & set(test[id_col].astype(str)):
            out.add(key, None, f"run {folder} predicted none of this test set's ids", fix)


def _answers(cfg: Config, out: CheckResult, labels: dict | None, test: pd.DataFrame | None) -> None:
    """data.answers_csv: readable, with the id and label columns, labels known, ids of the test set."""
    d = cfg.data
    need = {"data.id_col": d.id_col, "data.label_col": d.label_col}
    key = "data.answers_csv (or clear it: data.answers_csv=)"
    answers = _read_csv(out.root, d.answers_csv, key, need, 0, out)
    if answers is None:
        return
    if labels is not None:
        _check_labels(answers[d.label_col], labels, d.answers_csv, out, d.hierarchy_sep)
    if test is not None and d.id_col in test.columns and not (d.limit or d.train_limit):
        unknown = sorted(set(answers[d.id_col]) - set(test[d.id_col]))
        if unknown:
            msg = f"{len(unknown)} ids are not in {d.test_csv}, e.g. {unknown[:3]}"
            out.add(d.answers_csv, None, msg, "is it the answer file of another competition?")


def _mix_dataset(path: Path, out: CheckResult) -> None:
    """train.mix_dataset: JSONL whose every line has `messages` ending with an assistant turn."""
    fix = 'one {"messages": [..., {"role": "assistant", ...}]} per line, or set train.mix_ratio=0'
    if not path.is_file():
        out.add(str(path), None, "train.mix_dataset: file not found", fix)
        return
    lines = [(i, t) for i, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if t.strip()]
    if not lines:
        out.add(str(path), None, "train.mix_dataset is empty", fix)
    for i, text in lines:
        try:
            messages = json.loads(text).get("messages")
            ok = bool(messages) and messages[-1].get("role") == "assistant"
        except (json.JSONDecodeError, AttributeError, TypeError):
            ok = False
        if not ok:
            out.add(str(path), i, "not a JSON object with 'messages' ending in an assistant message", fix)


def _writable_folder(path: Path, key: str, out: CheckResult) -> None:
    """A cache folder that exists and is writable, or can be created (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        out.add(
            str(path),
            None,
            f"{key} cannot be created or written ({probe} is not a writable folder)",
            f"point {key} at a folder you can write",
        )


def _finished_run(name: str, runs_dir: Path, table: str, key: str, out: CheckResult) -> Path | None:
    """A source run named by a setting: finished, with the table this run will read from it. Its folder,
    or None after adding the problem."""
    if not name:
        out.add(key, None, f"{key} is empty but this run needs it", f"set {key}=<a finished run>")
        return None
    from vlmexp.rundir import RunNotFound, find_run

    try:
        folder = find_run(name, runs_dir).root
    except RunNotFound as e:
        out.add(key, None, str(e), "finish that run first, or give its folder path (see `exp leaderboard`)")
        return None
    if not (folder / table).is_file():
        out.add(key, None, f"run {folder} has no {table}", "rerun it to completion, or pick another")
        return None
    return folder
