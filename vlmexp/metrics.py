"""Accuracy, macro-F1, per-class scores and the confusion matrix.

A prediction that is None/NaN (generation whose answer could not be parsed) or not one of the
labels counts as wrong: it takes no true positive and still costs its true class recall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

# Stands in for a missing prediction; never a real label, so it is never right.
UNPARSED = "(unparsed)"


def as_labels(values: Sequence | pd.Series | np.ndarray) -> np.ndarray:
    """Object array of label strings; a missing value becomes UNPARSED."""
    return np.array([UNPARSED if _missing(v) else str(v) for v in values], dtype=object)


def _missing(v: object) -> bool:
    return v is None or (not isinstance(v, str) and bool(pd.isna(v)))


def score(y_true, y_pred, labels: list[str]) -> dict:
    """{"accuracy", "macro_f1", "n", "unparsed"} over the given samples. Macro-F1 averages over every
    class of `labels`, present or not (an absent class scores 0; scikit-learn's default would skip a
    class absent from both truth and predictions), so every fold is averaged over the same classes."""
    t, p = as_labels(y_true), as_labels(y_pred)
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} values but y_pred has {len(p)}")
    if len(t) == 0:
        raise ValueError("cannot score zero samples")
    return {
        "accuracy": float(np.mean(t == p)),
        "macro_f1": float(f1_score(t, p, labels=list(labels), average="macro", zero_division=0)),
        "n": int(len(t)),
        "unparsed": int(np.sum(p == UNPARSED)),
    }


def level_scores(y_true, y_pred, tree: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Accuracy and macro-F1 per level of two-level labels (`Competition.tree`, {parent: [full paths]}).

    level1 compares parents only: "money/payment" predicted for "money/refund_request" is right there;
    level2 compares full paths (the plain score). A prediction outside the tree (unparsed) is wrong at both.
    {"level1": {"accuracy": 0.9, "macro_f1": 0.88}, "level2": {"accuracy": 0.7, "macro_f1": 0.65}}
    """
    parent_of = {label: parent for parent, children in tree.items() for label in children}
    t, p = as_labels(y_true), as_labels(y_pred)
    up = [[parent_of.get(v, UNPARSED) for v in values] for values in (t, p)]
    levels = {"level1": (*up, list(tree)), "level2": (t, p, list(parent_of))}
    out = {}
    for level, (true, pred, labels) in levels.items():
        s = score(true, pred, labels)
        out[level] = {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"]}
    return out


def per_class_report(y_true, y_pred, labels: list[str]) -> pd.DataFrame:
    """One row per label in class order (index "label"): precision, recall, f1, support.

    Write it with `df.reset_index()`, as `tables.write_table` drops the index.
    """
    t, p = as_labels(y_true), as_labels(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p, labels=list(labels), zero_division=0
    )
    return pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support},
        index=pd.Index(list(labels), name="label"),
    )


def confusion(y_true, y_pred, labels: list[str]) -> pd.DataFrame:
    """Counts with true labels as the index ("true") and predicted labels as columns ("pred").

    If some predictions are missing or not a label, one more column `(unparsed)` holds them, so
    that each row still sums to the class support. Write it with `df.reset_index()`.
    """
    t, p = as_labels(y_true), as_labels(y_pred)
    cols = list(labels) + ([UNPARSED] if np.any(~np.isin(p, list(labels))) else [])
    p = np.where(np.isin(p, list(labels)), p, UNPARSED)
    m = confusion_matrix(t, p, labels=cols)[: len(labels)]
    df = pd.DataFrame(m, index=pd.Index(list(labels), name="true"), columns=pd.Index(cols, name="pred"))
    return df


def cv_summary(oof: pd.DataFrame, labels: list[str], metric: str) -> dict:
    """The CV of an out-of-fold table (`label`, `pred`, `fold`): per-fold `metric`, their mean and std,
    and accuracy / macro-F1 over all rows, e.g. {"mean": 0.71, "std": 0.03, "folds": [0.69, ...], ...}."""
    folds = [score(g["label"], g["pred"], labels)[metric] for _, g in oof.groupby("fold")]
    overall = score(oof["label"], oof["pred"], labels)
    return {
        "metric": metric,
        "mean": float(np.mean(folds)),
        "std": float(np.std(folds)),
        "folds": folds,
        "accuracy": overall["accuracy"],
        "macro_f1": overall["macro_f1"],
        "n_oof": len(oof),
    }
