"""One stored fold assignment per dataset, shared by every experiment.

Two runs that differ only in their prompt must be scored on exactly the same folds, or a
per-fold delta mixes the prompt's effect with the split's. So the split is computed once per
(data, k, seed) and stored as `folds-<datahash>-k5-s42.csv`; later runs read it back.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from vlmexp.tables import read_table, write_table


class FoldError(ValueError):
    """The training table cannot be split as asked; the message says why."""


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


def assign_folds(train: pd.DataFrame, k: int, seed: int, store_dir: Path) -> pd.Series:
    """Fold number (0..k-1) per training id, stratified by label and grouped by `group` if present.

    Returns a Series indexed by `id` in the row order of `train`, named "fold".
    """
    _check(train, k)
    path = fold_path(train, k, seed, store_dir)
    if path.exists():
        stored = read_table(path)
        folds = stored.set_index("id")["fold"].astype(int)
        missing = set(train["id"]) - set(folds.index)
        if missing:
            # The hash covers the ids, so this means the file was edited or truncated by hand.
            raise FoldError(
                f"{path} lacks {len(missing)} training ids (e.g. {sorted(missing)[:3]}); delete it"
            )
    else:
        folds = pd.Series(_split(train, k, seed), index=train["id"].to_numpy(), name="fold")
        write_table(pd.DataFrame({"id": folds.index, "fold": folds.to_numpy()}), path)
    out = folds.reindex(train["id"].to_numpy())
    out.index.name = "id"
    out.name = "fold"
    return out.astype(int)


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
        warnings.warn(
            f"{len(rare)} classes have fewer than k={k} members and cannot appear in every fold: "
            + ", ".join(f"{label} ({n})" for label, n in rare.items()),
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
        return fn()
