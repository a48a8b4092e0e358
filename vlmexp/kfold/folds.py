"""One stored fold assignment per dataset, shared by every experiment.

Two runs that differ only in their prompt must be scored on exactly the same folds, or a
per-fold delta mixes the prompt's effect with the split's. So the split is computed once per
(data, k, seed) and stored as `folds-<datahash>-k5-s42.csv`; later runs read it back.
Beside it, `folds-<datahash>-k5-s42.json` records the competition fingerprint it was computed on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from vlmexp.data import DataError
from vlmexp.fingerprint import fingerprint_changes
from vlmexp.tables import read_table, write_json, write_table


class FoldError(DataError):
    """The training table cannot be split as asked (or its folds no longer fit it); the message says why.

    A DataError, so `exp run` prints it as one line with its fix instead of a traceback.
    """


def data_hash(train: pd.DataFrame) -> str:
    """12-hex sha256 of the sorted (id, label, group) rows: same data, same hash, whatever the row order."""
    group = train["group"] if "group" in train.columns else pd.Series([""] * len(train), index=train.index)
    rows = sorted(
        "\x1f".join(_text(v) for v in row) for row in zip(train["id"], train["label"], group, strict=True)
    )
    return hashlib.sha256("\x1e".join(rows).encode("utf-8")).hexdigest()[:12]


def _text(v: object) -> str:
    return "" if pd.isna(v) else str(v)


def fold_path(train: pd.DataFrame, k: int, seed: int, store_dir: Path) -> Path:
    return Path(store_dir) / f"folds-{data_hash(train)}-k{k}-s{seed}.csv"


def assign_folds(
    train: pd.DataFrame, k: int, seed: int, store_dir: Path, fingerprint: dict | None = None
) -> pd.Series:
    """Fold number (0..k-1) per training id, stratified by label and grouped by `group` if present.

    Returns a Series indexed by `id` in the row order of `train`, named "fold". `fingerprint`
    (fingerprint.competition_fingerprint) is stored beside a new assignment, and named when a stored one
    no longer matches the data.
    """
    _check(train, k)
    path = fold_path(train, k, seed, store_dir)
    if path.exists():
        stored = read_table(path)
        folds = stored.set_index("id")["fold"].astype(int)
        _refuse_mismatch(path, train, folds, fingerprint)
    else:
        folds = pd.Series(_split(train, k, seed), index=train["id"].to_numpy(), name="fold")
        write_table(pd.DataFrame({"id": folds.index, "fold": folds.to_numpy()}), path)
        write_json({"fingerprint": fingerprint, "data_hash": data_hash(train)}, path.with_suffix(".json"))
    out = folds.reindex(train["id"].to_numpy())
    out.index.name = "id"
    out.name = "fold"
    return out.astype(int)


def _refuse_mismatch(path: Path, train: pd.DataFrame, folds: pd.Series, fingerprint: dict | None) -> None:
    """A stored assignment must hold exactly the training ids, once each.

    Its name hashes the (id, label, group) rows, so a mismatch means the file was edited by hand or
    the data it was computed on changed under the same name; the fingerprint beside it says what.
    """
    want, have = set(train["id"]), list(folds.index)
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    repeated = sorted(set(folds.index[folds.index.duplicated()]))
    if not (missing or extra or repeated):
        return
    parts = [
        f"{len(ids)} {what} (e.g. {ids[:3]})"
        for what, ids in (
            ("training ids missing", missing),
            ("ids not in the training data", extra),
            ("ids repeated", repeated),
        )
        if ids
    ]
    note = path.with_suffix(".json")
    old = json.loads(note.read_text(encoding="utf-8")).get("fingerprint") if note.exists() else None
    changed = ""
    if old and fingerprint:
        changes = fingerprint_changes(old, fingerprint)
        changed = "; the data changed since it was computed: " + "; ".join(changes)
    raise FoldError(
        f"stored fold assignment {path} does not match the training data: {', '.join(parts)}{changed}. "
        "Delete that file (and its .json) to compute the folds again; runs already made on the old "
        "folds are then no longer comparable fold by fold"
    )


def check_oof_ids(oof_ids: pd.Series, train_ids: list[str]) -> None:
    """Every training id predicted out-of-fold exactly once, and nothing else: else the CV is not a CV.

    E.g. data edited between folds gave 60 OOF rows with 10 ids twice, 5 ids no longer in the data
    and 15 rows never scored; such a score must not be reported.
    """
    ids = pd.Series(oof_ids, dtype=str)
    want = set(map(str, train_ids))
    repeated = sorted(set(ids[ids.duplicated()]))
    extra = sorted(set(ids) - want)
    never = sorted(want - set(ids))
    if repeated or extra or never:
        parts = [
            f"{len(v)} {what}, e.g. {v[:3]}"
            for what, v in (
                ("ids repeated", repeated),
                ("ids not in the training data", extra),
                ("training ids never predicted", never),
            )
            if v
        ]
        raise FoldError(
            "out-of-fold predictions do not cover the training data once each: " + "; ".join(parts) + ". "
            "The data or the folds changed between folds; rerun with --force (or a new name=...)"
        )


def _check(train: pd.DataFrame, k: int) -> None:
    for col in ("id", "label"):
        if col not in train.columns:
            raise FoldError(f"training table has no '{col}' column; columns are {list(train.columns)}")
    if k < 2:
        raise FoldError(f"k={k}: K-fold needs at least 2 folds, e.g. folds=5")
    if k > len(train):
        raise FoldError(
            f"k={k} folds but only {len(train)} training rows; use folds={max(2, len(train))} or less"
        )
    dup = train["id"][train["id"].duplicated()]
    if len(dup):
        raise FoldError(f"training ids must be unique; {len(dup)} repeat, e.g. {list(dup.unique()[:3])}")
    if train["label"].isna().any():
        raise FoldError(f"{int(train['label'].isna().sum())} training rows have no label; fix train.csv")


def _split(train: pd.DataFrame, k: int, seed: int) -> list[int]:
    y = train["label"].astype(str).to_numpy()
    counts = train["label"].value_counts()
    rare = counts[counts < k]
    if len(rare):
        names = ", ".join(f"{label} ({n})" for label, n in rare.items())
        fewer = max(2, int(counts.max()) if len(rare) == len(counts) else int(rare.min()))
        # folds=2 is the least there is: a class of 1 row cannot be in two folds however k is set.
        fix = "add rows to those classes, or merge or drop them (labels.json and train.csv)"
        if fewer < k:
            fix = f"use folds={fewer} or fewer, {fix}"
        if len(rare) == len(counts):  # sklearn: "n_splits=5 cannot be greater than the number of members"
            raise FoldError(f"k={k} folds but every class has fewer than {k} rows: {names}; {fix}")
        warnings.warn(
            f"{len(rare)} classes have fewer than k={k} members and cannot appear in every fold: "
            f"{names}; to fix: {fix}",
            UserWarning,
            stacklevel=3,
        )
    fold = [0] * len(train)
    if "group" in train.columns and train["group"].notna().any():
        # A row without a group is its own group: it may land in any fold.
        groups = [
            f"id:{i}" if pd.isna(g) else f"group:{g}"
            for i, g in zip(train["id"], train["group"], strict=True)
        ]
        if len(set(groups)) < k:
            raise FoldError(
                f"k={k} folds but only {len(set(groups))} groups; use folds={len(set(groups))} or less"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = _quiet(lambda: list(splitter.split(y, y, groups)))
    else:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = _quiet(lambda: list(splitter.split(y, y)))
    for f, (_, val) in enumerate(splits):
        for i in val:
            fold[i] = f
    return fold


def _quiet(fn):
    # sklearn repeats our rare-class warning in its own words ("The least populated class in y
    # has only 1 members..."); ours names the classes, so theirs is dropped.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            return fn()
        except ValueError as e:  # any other split sklearn refuses: its words, without its traceback
            raise FoldError(f"cannot split the training rows into folds: {e}; try fewer folds") from None
