"""Class-balanced resampling of one fold's training split.

Only a fold's training split ever passes through here (the runner guarantees it): resampling
before the split would copy a validation image into training and inflate the CV score.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

METHODS = ("none", "oversample", "sqrt", "undersample")

# undersample never cuts a class below this many rows: with one 2-image class, cutting every
# class to 2 would train on 2 images per class. E.g. counts {a: 50, b: 2} -> {a: 10, b: 2}.
UNDERSAMPLE_FLOOR = 10


def _counts(df: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in df["label"].value_counts().sort_index().items()}


def _targets(counts: dict[str, int], how: str, floor: int) -> dict[str, int]:
    n_max, n_min = max(counts.values()), min(counts.values())
    if how == "none":
        return dict(counts)
    if how == "oversample":
        return {c: n_max for c in counts}
    if how == "sqrt":
        # Geometric mean of own and largest count: {a: 100, b: 4} -> b to 20; never below own count.
        return {c: max(n, round(math.sqrt(n * n_max))) for c, n in counts.items()}
    return {c: min(n, max(n_min, floor)) for c, n in counts.items()}


def _upsample(rows: pd.DataFrame, target: int, rng: np.random.Generator) -> pd.DataFrame:
    # Whole copies first, then a without-replacement draw for the remainder, so every image
    # appears floor/ceil(target/n) times. Plain draws with replacement would show one image
    # four times and another not at all, adding noise without adding balance.
    n = len(rows)
    reps, rest = divmod(target, n)
    extra = rng.choice(n, size=rest, replace=False)
    picks = np.concatenate([np.tile(np.arange(n), reps), extra])
    return rows.iloc[picks]


def resample(
    train_split: pd.DataFrame, how: str, seed: int, floor: int = UNDERSAMPLE_FLOOR
) -> tuple[pd.DataFrame, dict[str, int], dict[str, int]]:
    """(resampled rows, class counts before, class counts after); deterministic given `seed`.

    none: unchanged. oversample: every class up to the largest count (originals kept, repeated).
    sqrt: each class up to round(sqrt(n_c * n_max)); only rare classes grow, none shrinks.
    undersample: every class down to max(smallest count, `floor`); smaller classes keep all rows.
    """
    if how not in METHODS:
        raise ValueError(f"balance='{how}'; choose one of {', '.join(METHODS)}")
    if "label" not in train_split.columns or train_split.empty:
        raise ValueError("resample needs a non-empty table with a 'label' column")
    before = _counts(train_split)
    if how == "none":
        return train_split.reset_index(drop=True), before, dict(before)
    targets = _targets(before, how, floor)
    rng = np.random.default_rng(seed)
    labels = train_split["label"].astype(str)
    parts = []
    for c in sorted(before):  # fixed class order keeps the random stream deterministic
        rows = train_split[labels == c]
        if targets[c] >= len(rows):
            parts.append(_upsample(rows, targets[c], rng))
        else:
            parts.append(rows.iloc[np.sort(rng.choice(len(rows), size=targets[c], replace=False))])
    out = pd.concat(parts)
    out = out.iloc[rng.permutation(len(out))].reset_index(drop=True)
    return out, before, _counts(out)
