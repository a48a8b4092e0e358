"""Fold ensembles of test predictions, their disagreements, and suspect training labels.

Each fold's model predicts the whole test set, so a K-fold run gives K prediction tables
(`id`, `pred`, `p:<label>`...). A fold's vote is its `pred`; a missing pred (unparsed
generation) is an abstention, shown as `(none)` in the vote split.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from vlmexp.tables import prob_columns, probs

ABSTAIN = "(none)"
POLICIES = ("soft", "majority", "confident", "rerun")


def _stack(fold_tables: list[pd.DataFrame], labels: list[str]) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """Ids (first table's order), probabilities (folds, rows, classes) and votes (folds, rows)."""
    if not fold_tables:
        raise ValueError("no fold tables to ensemble")
    ids = pd.Index(fold_tables[0]["id"].astype(str))
    if ids.has_duplicates:
        raise ValueError(f"fold table 0 repeats ids, e.g. {list(ids[ids.duplicated()][:3])}")
    p, v = [], []
    for i, t in enumerate(fold_tables):
        missing_cols = [c for c in ["id", "pred", *prob_columns(labels)] if c not in t.columns]
        if missing_cols:
            raise ValueError(f"fold table {i} lacks columns {missing_cols}")
        t = t.set_index(t["id"].astype(str))
        if len(t) != len(ids) or not t.index.sort_values().equals(ids.sort_values()):
            diff = sorted(set(ids).symmetric_difference(t.index))[:3]
            raise ValueError(f"fold table {i} covers other ids than fold table 0 (e.g. {diff})")
        t = t.loc[ids]
        p.append(probs(t, labels))
        v.append([ABSTAIN if pd.isna(x) else str(x) for x in t["pred"]])
    return ids, np.stack(p), np.array(v, dtype=object)


def _mean_probs(p: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN on purpose
        return np.nanmean(p, axis=0)


def _majority(votes: np.ndarray, mean: np.ndarray, labels: list[str]) -> np.ndarray:
    """Most-voted label per row; a tie goes to the tied label with the higher mean probability."""
    counts = np.stack([(votes == label).sum(axis=0) for label in labels], axis=1).astype(float)
    tiebreak = np.nan_to_num(mean, nan=0.0) * 1e-3  # < 1 vote, so it only orders equal counts
    best = np.argmax(counts + tiebreak, axis=1)
    return np.array(labels, dtype=object)[best]


def _soft(votes: np.ndarray, mean: np.ndarray, labels: list[str]) -> np.ndarray:
    pred = np.array(labels, dtype=object)[np.argmax(np.nan_to_num(mean, nan=-1.0), axis=1)]
    no_probs = np.isnan(mean).all(axis=1)
    pred[no_probs] = _majority(votes, mean, labels)[no_probs]  # no probabilities at all: count votes
    return pred


def _vote_split(votes: np.ndarray, labels: list[str]) -> list[str]:
    order = {label: i for i, label in enumerate([*labels, ABSTAIN])}
    out = []
    for col in votes.T:
        names, n = np.unique(col, return_counts=True)
        pairs = sorted(zip(names, n, strict=True), key=lambda x: (-x[1], order.get(x[0], len(order))))
        out.append("|".join(f"{name}:{c}" for name, c in pairs))
    return out


def vote(fold_tables: list[pd.DataFrame], labels: list[str], how: str = "soft") -> pd.DataFrame:
    """Test ensemble: id, pred, p:<label> (fold mean), agree (share of folds voting pred), votes.

    soft: pred = argmax of the mean probabilities. majority: most votes, ties by mean probability.
    Example row: id="t1", pred="refund", agree=0.6, votes="refund:3|payment:2".
    """
    if how not in ("soft", "majority"):
        raise ValueError(f"vote how='{how}'; choose soft or majority")
    ids, p, votes = _stack(fold_tables, labels)
    mean = _mean_probs(p)
    pred = _soft(votes, mean, labels) if how == "soft" else _majority(votes, mean, labels)
    out = pd.DataFrame({"id": ids, "pred": pred})
    out[prob_columns(labels)] = mean
    out["agree"] = (votes == pred[None, :]).mean(axis=0)
    out["votes"] = _vote_split(votes, labels)
    return out


def _fold_names(fold_tables: list[pd.DataFrame]) -> list[str]:
    # A table's own `fold` column names it (fold3) when present; else its list position.
    names = []
    for i, t in enumerate(fold_tables):
        f = t["fold"].dropna().unique() if "fold" in t.columns else []
        names.append(f"pred_fold{int(f[0])}" if len(f) == 1 else f"pred_fold{i}")
    return names if len(set(names)) == len(names) else [f"pred_fold{i}" for i in range(len(fold_tables))]


def disagreements(fold_tables: list[pd.DataFrame], labels: list[str]) -> pd.DataFrame:
    """Rows where the folds do not all vote the same: id, pred (soft), agree, votes, pred_fold<k>..."""
    ids, _, votes = _stack(fold_tables, labels)
    ens = vote(fold_tables, labels, "soft")
    split = (votes != votes[0:1]).any(axis=0)
    out = ens.loc[split, ["id", "pred", "agree", "votes"]].reset_index(drop=True)
    for name, row in zip(_fold_names(fold_tables), votes[:, split], strict=True):
        out[name] = row
    return out


def reconcile(
    ensemble: pd.DataFrame,
    fold_tables: list[pd.DataFrame],
    labels: list[str],
    policy: str,
    rerun_table: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Decide the disputed rows (folds not unanimous) of `ensemble` (from `vote`) by `policy`.

    soft / majority: that vote; confident: the pred of the fold most sure of its own pred;
    rerun: the pred (and probabilities) of `rerun_table`, another run's ensemble on these ids.
    Undisputed rows are unchanged. `decided_by` says "unanimous" or the policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"reconcile policy '{policy}'; choose one of {', '.join(POLICIES)}")
    ids, p, votes = _stack(fold_tables, labels)
    out = ensemble.set_index(ensemble["id"].astype(str)).loc[ids].reset_index(drop=True)
    disputed = (votes != votes[0:1]).any(axis=0)
    out["decided_by"] = np.where(disputed, policy, "unanimous")
    mean = _mean_probs(p)
    if policy == "soft":
        new = _soft(votes, mean, labels)
    elif policy == "majority":
        new = _majority(votes, mean, labels)
    elif policy == "confident":
        new = _confident(votes, p, labels)
    else:
        new = out["pred"].to_numpy(dtype=object).copy()
        sub = _rerun_rows(rerun_table, ids[disputed], labels)
        new[disputed] = sub["pred"].to_numpy(dtype=object)
        have = [c for c in prob_columns(labels) if c in sub.columns]
        if len(have) == len(labels):
            out.loc[disputed, have] = sub[have].to_numpy()
    out.loc[disputed, "pred"] = new[disputed]
    return out


def _confident(votes: np.ndarray, p: np.ndarray, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    # Confidence of a fold = its probability of its own vote; an abstaining fold has none.
    conf = np.full(votes.shape, -np.inf)
    for f in range(votes.shape[0]):
        for r in range(votes.shape[1]):
            c = index.get(votes[f, r])
            if c is not None and not np.isnan(p[f, r, c]):
                conf[f, r] = p[f, r, c]
    best = np.argmax(conf, axis=0)  # ties: the lowest fold
    return votes[best, np.arange(votes.shape[1])]


def _rerun_rows(rerun_table: pd.DataFrame | None, ids: pd.Index, labels: list[str]) -> pd.DataFrame:
    if rerun_table is None:
        raise ValueError("reconcile policy 'rerun' needs rerun_table: set ensemble.rerun_from=<finished run>")
    table = rerun_table.set_index(rerun_table["id"].astype(str))
    missing = ids.difference(table.index)
    if len(missing):
        raise ValueError(
            f"rerun table lacks {len(missing)} disputed ids (e.g. {list(missing[:3])}); "
            "it must hold predictions for the same test set"
        )
    sub = table.loc[ids]
    if sub["pred"].isna().any():
        raise ValueError(f"rerun table has no pred for {int(sub['pred'].isna().sum())} disputed ids")
    return sub


def suspect_labels(oof: pd.DataFrame, labels: list[str], threshold: float) -> pd.DataFrame:
    """OOF rows whose probability of some label other than the gold one exceeds `threshold`.

    Columns: id, label (gold), suggested, confidence (prob of suggested), plus fold if present;
    most confident first. Example: id="a17", label="refund", suggested="payment", confidence=0.97.
    """
    p = probs(oof, labels)
    gold = np.array([labels.index(x) if x in labels else -1 for x in oof["label"].astype(str)])
    other = p.copy()
    valid = gold >= 0
    other[np.flatnonzero(valid), gold[valid]] = -np.inf
    best = np.argmax(np.nan_to_num(other, nan=-np.inf), axis=1)
    conf = other[np.arange(len(oof)), best]
    hit = conf > threshold
    out = pd.DataFrame(
        {
            "id": oof["id"].astype(str).to_numpy()[hit],
            "label": oof["label"].astype(str).to_numpy()[hit],
            "suggested": np.array(labels, dtype=object)[best[hit]],
            "confidence": conf[hit],
        }
    )
    if "fold" in oof.columns:
        out["fold"] = oof["fold"].to_numpy()[hit]
    return out.sort_values("confidence", ascending=False, kind="stable").reset_index(drop=True)


def apply_suspects(train: pd.DataFrame, suspects: pd.DataFrame, how: str = "keep") -> pd.DataFrame:
    """keep: train unchanged; relabel: label := suggested for suspect ids; drop: remove them."""
    if how not in ("keep", "relabel", "drop"):
        raise ValueError(f"suspects how='{how}'; choose keep, relabel or drop")
    train = train.copy()
    if how == "keep" or suspects.empty:
        return train
    ids = train["id"].astype(str)
    sus = suspects.assign(id=suspects["id"].astype(str)).drop_duplicates("id").set_index("id")
    known = sus.index.isin(ids)
    if not known.any():
        raise ValueError(
            f"none of the {len(sus)} suspect ids is in the training table (e.g. {list(sus.index[:3])}); "
            "ensemble.suspects_from must name a run on this same data"
        )
    if not known.all():
        # e.g. the source run used all rows and this one data.limit=100: the rest do not apply.
        warnings.warn(
            f"{int((~known).sum())} suspect ids are not in this training table; ignored", stacklevel=2
        )
    if how == "drop":
        return train[~ids.isin(sus.index)].reset_index(drop=True)
    hit = ids.isin(sus.index).to_numpy()
    train.loc[hit, "label"] = ids[hit].map(sus["suggested"]).to_numpy()
    return train
