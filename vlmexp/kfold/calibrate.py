"""Per-class bias calibration (`ensemble.calibrate=bias`): offsets on the log-probabilities, fitted on
the OOF table to maximise the run's metric, applied to the test ensemble.

argmax under-predicts a rare class whose rows the model scores second-best: a row with
p = (0.45, 0.15, 0.40) is always called class 0. Adding b = (0, 0, 0.25) to log p calls it class 2
while a common-class row p = (0.7, 0.1, 0.2) stays class 0. The offsets are fitted by coordinate
ascent over a grid (one class at a time, a few rounds), which needs no gradient of macro-F1.

An offset fitted on rows and scored on the same rows flatters itself, so the CV of a calibrated run
is cross-fitted: fold k's OOF rows are scored with offsets fitted on the other folds' rows only.
The test ensemble gets offsets fitted on every OOF row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlmexp.tables import prob_columns, probs

log = logging.getLogger(__name__)

# Offsets in nats: +-3 multiplies a class's odds by up to e^3 ~ 20; a step of 0.125 is ~13% in odds.
GRID = np.arange(-3.0, 3.0001, 0.125)
ROUNDS = 3  # passes over the classes; the second rarely changes more than one offset
FLOOR = 1e-12  # probability floor before the log: generate mode's one-hot rows have zeros


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.nan_to_num(p, nan=0.0), FLOOR, None))


def _score(y: np.ndarray, pred: np.ndarray, n_classes: int, metric: str) -> float:
    """accuracy or macro-F1 over all classes (a class never seen nor predicted scores 0), as
    sklearn's f1_score(labels=all, average="macro", zero_division=0) does, without its overhead."""
    if metric == "accuracy":
        return float(np.mean(pred == y))
    tp = np.bincount(y[pred == y], minlength=n_classes)
    fp = np.bincount(pred, minlength=n_classes) - tp
    fn = np.bincount(y, minlength=n_classes) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return float(f1.mean())


def fit_bias(p: np.ndarray, y: np.ndarray, metric: str = "macro_f1") -> np.ndarray:
    """Offsets b (n_classes,) maximising `metric` of argmax(log p + b) on rows `p` with gold class
    indices `y`. Only strict improvements move an offset, so a model argmax already serves keeps b = 0."""
    logp = _log(p)
    n, c = logp.shape
    b = np.zeros(c)
    best = _score(y, np.argmax(logp, axis=1), c, metric)
    for _ in range(ROUNDS):
        moved = False
        for j in range(c):
            # Every class but j keeps its offset: its best competitor per row is fixed while b_j varies.
            s = logp + b
            s[:, j] = -np.inf
            other, other_score = np.argmax(s, axis=1), np.max(s, axis=1)
            for v in GRID:
                pred = np.where(logp[:, j] + v > other_score, j, other)
                got = _score(y, pred, c, metric)
                if got > best + 1e-12:
                    best, b[j], moved = got, v, True
        if not moved:
            break
    return b


def apply_bias(table: pd.DataFrame, labels: list[str], b: np.ndarray) -> pd.DataFrame:
    """A copy of a prediction table with p:<label> = softmax(log p + b) and pred = its argmax; the
    old pred is kept as `pred_raw`. Rows without any probability (unparsed generations) keep theirs."""
    p = probs(table, labels)
    # softmax(log p + b) = p e^b / sum(p e^b): exact, and a probability of 0 stays 0.
    w = np.nan_to_num(p, nan=0.0) * np.exp(b)
    total = w.sum(axis=1, keepdims=True)
    empty = total[:, 0] <= 0
    q = w / np.where(total > 0, total, 1.0)
    out = table.copy()
    out["pred_raw"] = table["pred"]
    pred = np.array(labels, dtype=object)[np.argmax(_log(p) + b, axis=1)]
    out["pred"] = np.where(empty, table["pred"].to_numpy(dtype=object), pred)
    out[prob_columns(labels)] = np.where(empty[:, None], p, q)
    if "votes" in out.columns and "agree" in out.columns:
        # A fold ensemble's agree is the share of folds voting pred: recount it for the new pred, else
        # pseudo-labelling would read "all 5 folds agree" on a label that no fold voted.
        out["agree"] = [_share(v, x) for v, x in zip(out["votes"], out["pred"], strict=True)]
    return out


def _share(votes: str, pred) -> float:
    """'refund:3|payment:2', 'payment' -> 0.4."""
    counts = dict(part.rsplit(":", 1) for part in str(votes).split("|") if ":" in part)
    total = sum(int(n) for n in counts.values())
    return int(counts.get(str(pred), 0)) / total if total else 0.0


@dataclass
class CrossFit:
    """The honest CV of calibration: per-fold scores of offsets fitted without that fold."""

    folds: list[float]  # metric of fold k's rows under offsets fitted on the other folds
    oof: pd.DataFrame  # the OOF table with cross-fitted calibrated preds (pred_raw: the original)
    offsets: dict[int, np.ndarray]  # fold -> the offsets that scored it

    @property
    def mean(self) -> float:
        return float(np.mean(self.folds))

    @property
    def std(self) -> float:
        return float(np.std(self.folds))


def _gold(oof: pd.DataFrame, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(oof["label"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"OOF labels {unknown[:3]} are not among the run's {len(labels)} labels")
    return oof["label"].astype(str).map(index).to_numpy()


def cross_fit(oof: pd.DataFrame, labels: list[str], metric: str = "macro_f1") -> CrossFit:
    """Score each fold's OOF rows with offsets fitted on the other folds' OOF rows only."""
    if "fold" not in oof.columns or oof["fold"].nunique() < 2:
        raise ValueError("cross-fitted calibration needs an OOF table with a `fold` column of 2+ folds")
    y, p = _gold(oof, labels), probs(oof, labels)
    folds = oof["fold"].to_numpy()
    scores, offsets, parts = [], {}, []
    for k in sorted(set(folds)):
        held = folds == k
        b = fit_bias(p[~held], y[~held], metric)
        part = apply_bias(oof[held], labels, b)
        pred = part["pred"].map({label: i for i, label in enumerate(labels)}).fillna(-1).to_numpy(int)
        scores.append(_score(y[held], pred, len(labels), metric))
        offsets[int(k)] = b
        parts.append(part)
    return CrossFit(scores, pd.concat(parts).loc[oof.index], offsets)


def calibrate_run(
    oof: pd.DataFrame, test: pd.DataFrame, labels: list[str], metric: str
) -> tuple[pd.DataFrame, CrossFit, np.ndarray]:
    """(calibrated test ensemble, cross-fitted CV, offsets fitted on every OOF row) of one run."""
    cv = cross_fit(oof, labels, metric)
    b = fit_bias(probs(oof, labels), _gold(oof, labels), metric)
    log.info(
        "calibration (bias): CV %s %.4f ± %.4f cross-fitted; offsets %s",
        metric,
        cv.mean,
        cv.std,
        " ".join(f"{label}:{v:+.2f}" for label, v in zip(labels, b, strict=True) if v),
    )
    return apply_bias(test, labels, b), cv, b


def summary(cv: CrossFit, b: np.ndarray, labels: list[str]) -> dict:
    """cv.json's "calibrated" entry: mean, std, per-fold scores and the test offsets per label."""
    return {
        "mean": cv.mean,
        "std": cv.std,
        "folds": cv.folds,
        "offsets": {label: float(v) for label, v in zip(labels, b, strict=True)},
    }
