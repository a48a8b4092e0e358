"""Confident, agreeing test predictions as extra training rows (pseudo-labels).

A pseudo row must only ever train, never validate: scoring a fold on labels its own ensemble
produced would measure agreement with itself, not accuracy. `split_with_pseudo` enforces that.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlmexp.tables import PROB_PREFIX, probs

# Pseudo rows get ids "pseudo:<test id>": test ids may repeat train ids (both "001", "002"...),
# and every later stage keys rows by id.
PSEUDO_ID_PREFIX = "pseudo:"


def select_pseudo(
    ensemble: pd.DataFrame, labels: list[str], min_agree: float, min_confidence: float
) -> pd.DataFrame:
    """Test rows with agree >= min_agree and ensemble p(pred) >= min_confidence.

    `ensemble` is `kfold.ensemble.vote(...)` output. Returns id, label (= pred), confidence, agree,
    pseudo (True), most confident first.
    """
    need = ["id", "pred", "agree", *(PROB_PREFIX + label for label in labels)]
    missing = [c for c in need if c not in ensemble.columns]
    if missing:
        raise ValueError(f"ensemble table lacks {missing}; pass the output of kfold.ensemble.vote")
    ens = ensemble[ensemble["pred"].isin(labels)]
    col = [labels.index(p) for p in ens["pred"]]
    conf = pd.Series(probs(ens, labels)[np.arange(len(ens)), col], index=ens.index, dtype=float)
    keep = (ens["agree"] >= min_agree) & (conf >= min_confidence)
    out = pd.DataFrame(
        {
            "id": ens.loc[keep, "id"].astype(str),
            "label": ens.loc[keep, "pred"].astype(str),
            "confidence": conf[keep],
            "agree": ens.loc[keep, "agree"].astype(float),
            "pseudo": True,
        }
    )
    return out.sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)


def add_pseudo(train: pd.DataFrame, test: pd.DataFrame, pseudo: pd.DataFrame) -> pd.DataFrame:
    """Train rows (pseudo=False) followed by one row per pseudo-label (pseudo=True).

    A pseudo row takes its image from `test` and its label from `pseudo`; its id becomes
    "pseudo:<test id>"; its other columns (reason, group) are empty.
    """
    base = train.copy()
    base["pseudo"] = False
    if pseudo.empty:  # e.g. pd.DataFrame() when the run has no pseudo source
        return base
    if "image" not in test.columns:
        raise ValueError(f"test table has no 'image' column; columns are {list(test.columns)}")
    images = test.set_index(test["id"].astype(str))["image"]
    pid = pseudo["id"].astype(str)
    unknown = pid[~pid.isin(images.index)]
    if len(unknown):
        raise ValueError(f"{len(unknown)} pseudo-label ids are not test ids (e.g. {list(unknown[:3])})")
    extra = pd.DataFrame(
        {
            "id": PSEUDO_ID_PREFIX + pid,
            "image": images.loc[pid].to_numpy(),
            "label": pseudo["label"].astype(str).to_numpy(),
            "pseudo": True,
        }
    )
    clash = set(extra["id"]) & set(base["id"].astype(str))
    if clash:
        raise ValueError(f"training table already holds pseudo ids {sorted(clash)[:3]}; add pseudo rows once")
    return pd.concat([base, extra], ignore_index=True)


def split_with_pseudo(
    train_with_pseudo: pd.DataFrame, folds: pd.Series, fold: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train split, validation split) of one fold: original rows by `folds`, pseudo rows always train."""
    df = train_with_pseudo
    is_pseudo = (
        df["pseudo"].fillna(False).astype(bool)
        if "pseudo" in df.columns
        else pd.Series(False, index=df.index)
    )
    orig_ids = df.loc[~is_pseudo, "id"].astype(str)
    fold_of = folds.copy()
    fold_of.index = fold_of.index.astype(str)
    missing = orig_ids[~orig_ids.isin(fold_of.index)]
    if len(missing):
        raise ValueError(
            f"{len(missing)} training ids have no fold (e.g. {list(missing[:3])}); reassign folds"
        )
    in_val = pd.Series(False, index=df.index)
    in_val[~is_pseudo] = (orig_ids.map(fold_of) == fold).to_numpy()
    if not in_val.any():
        raise ValueError(f"fold {fold} has no validation rows; folds are {sorted(fold_of.unique())}")
    return df[~in_val].reset_index(drop=True), df[in_val].reset_index(drop=True)
