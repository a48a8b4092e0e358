"""Fold voting, disagreements, reconciliation policies, suspect labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlmexp.kfold.ensemble import apply_suspects, disagreements, reconcile, suspect_labels, vote

LABELS = ["refund", "payment"]


def _table(fold: int, rows: dict[str, tuple[str | None, float]]) -> pd.DataFrame:
    """rows: id -> (pred, p(refund)); p(payment) = 1 - p(refund)."""
    return pd.DataFrame(
        {
            "id": list(rows),
            "fold": fold,
            "pred": [r[0] for r in rows.values()],
            "p:refund": [r[1] for r in rows.values()],
            "p:payment": [1 - r[1] for r in rows.values()],
        }
    )


@pytest.fixture
def folds() -> list[pd.DataFrame]:
    # t1: unanimous refund. t2: 2 payment (weak) vs 1 refund (very sure): soft and majority differ.
    # t3: 1-1 tie plus an abstention. Tables list ids in different orders on purpose.
    return [
        _table(0, {"t1": ("refund", 0.9), "t2": ("payment", 0.45), "t3": ("refund", 0.6)}),
        _table(1, {"t3": ("payment", 0.3), "t2": ("payment", 0.45), "t1": ("refund", 0.8)}),
        _table(2, {"t1": ("refund", 0.7), "t2": ("refund", 0.99), "t3": (None, 0.5)}),
    ]


def test_soft_vote(folds):
    ens = vote(folds, LABELS, "soft").set_index("id")
    assert list(ens.index) == ["t1", "t2", "t3"]
    assert ens.loc["t1", "p:refund"] == pytest.approx(0.8)
    assert ens.loc["t2", "p:refund"] == pytest.approx((0.45 + 0.45 + 0.99) / 3)
    assert ens.loc["t2", "pred"] == "refund"  # mean p(refund) = 0.63
    assert ens.loc["t2", "agree"] == pytest.approx(1 / 3)
    assert ens.loc["t2", "votes"] == "payment:2|refund:1"
    assert ens.loc["t1", "agree"] == 1.0 and ens.loc["t1", "votes"] == "refund:3"
    assert ens.loc["t3", "votes"] == "refund:1|payment:1|(none):1"


def test_majority_vote_and_tiebreak(folds):
    ens = vote(folds, LABELS, "majority").set_index("id")
    assert ens.loc["t2", "pred"] == "payment" and ens.loc["t2", "agree"] == pytest.approx(2 / 3)
    # t3 ties 1-1; mean p(refund) = (0.6+0.3+0.5)/3 = 0.467 < p(payment): payment wins
    assert ens.loc["t3", "pred"] == "payment"
    # probabilities stay the fold mean
    assert ens.loc["t2", "p:refund"] == pytest.approx(0.63)


def test_vote_rejects_mismatched_tables(folds):
    with pytest.raises(ValueError, match="other ids"):
        vote([folds[0], folds[1].iloc[:2]], LABELS)


def test_disagreements(folds):
    d = disagreements(folds, LABELS).set_index("id")
    assert list(d.index) == ["t2", "t3"]
    assert d.loc["t2", "votes"] == "payment:2|refund:1"
    assert list(d.loc["t2", ["pred_fold0", "pred_fold1", "pred_fold2"]]) == ["payment", "payment", "refund"]
    assert d.loc["t3", "pred_fold2"] == "(none)"


def test_reconcile_policies(folds):
    ens = vote(folds, LABELS, "soft")
    soft = reconcile(ens, folds, LABELS, "soft").set_index("id")
    assert soft.loc["t2", "pred"] == "refund" and soft.loc["t2", "decided_by"] == "soft"
    assert soft.loc["t1", "decided_by"] == "unanimous"
    maj = reconcile(ens, folds, LABELS, "majority").set_index("id")
    assert maj.loc["t2", "pred"] == "payment" and maj.loc["t1", "pred"] == "refund"
    conf = reconcile(ens, folds, LABELS, "confident").set_index("id")
    assert conf.loc["t2", "pred"] == "refund"  # fold 2 with p=0.99
    assert conf.loc["t3", "pred"] == "payment"  # fold 1: p(payment)=0.7 > fold 0: p(refund)=0.6
    rerun = pd.DataFrame(
        {"id": ["t3", "t2"], "pred": ["refund", "payment"], "p:refund": [0.8, 0.1], "p:payment": [0.2, 0.9]}
    )
    rr = reconcile(ens, folds, LABELS, "rerun", rerun_table=rerun).set_index("id")
    assert rr.loc["t2", "pred"] == "payment" and rr.loc["t3", "pred"] == "refund"
    assert rr.loc["t2", "p:payment"] == pytest.approx(0.9)
    assert rr.loc["t1", "pred"] == "refund" and rr.loc["t1", "p:refund"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="lacks 1 disputed ids"):
        reconcile(ens, folds, LABELS, "rerun", rerun_table=rerun.iloc[:1])
    with pytest.raises(ValueError, match="needs rerun_table"):
        reconcile(ens, folds, LABELS, "rerun")


def test_suspects_and_apply():
    oof = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "label": ["refund", "refund", "payment", "payment"],
            "fold": [0, 1, 0, 1],
            "pred": ["refund", "payment", "refund", "payment"],
            "p:refund": [0.99, 0.05, 0.92, 0.5],
            "p:payment": [0.01, 0.95, 0.08, 0.5],
        }
    )
    sus = suspect_labels(oof, LABELS, threshold=0.9)
    assert list(sus["id"]) == ["b", "c"]  # sorted by confidence
    assert list(sus["suggested"]) == ["payment", "refund"]
    assert sus["confidence"].tolist() == pytest.approx([0.95, 0.92])
    assert len(suspect_labels(oof, LABELS, threshold=0.99)) == 0
    train = oof[["id", "label"]].assign(image=["a.png", "b.png", "c.png", "d.png"])
    assert apply_suspects(train, sus, "keep").equals(train)
    rel = apply_suspects(train, sus, "relabel").set_index("id")
    assert rel["label"].tolist() == ["refund", "payment", "refund", "payment"]
    assert list(apply_suspects(train, sus, "drop")["id"]) == ["a", "d"]
    with pytest.raises(ValueError, match="none of the"):
        apply_suspects(train, sus.assign(id=["x", "y"]), "drop")
    assert np.all(train["label"] == oof["label"])  # inputs untouched


def test_vote_majority_is_not_undone_by_the_default_reconcile():
    """Two folds vote A at 0.4, one votes B at 0.95: majority says A, the mean probabilities say B.
    With the default reconcile=soft every disputed row was re-decided by the mean, so vote=majority
    changed nothing."""
    from vlmexp.config import load_config
    from vlmexp.recipe import reconcile_policy

    labels = ["A", "B", "C"]

    def table(pred, a, b, c):
        return pd.DataFrame({"id": ["x"], "pred": [pred], "p:A": [a], "p:B": [b], "p:C": [c]})

    tables = [table("A", 0.4, 0.3, 0.3), table("A", 0.4, 0.3, 0.3), table("B", 0.025, 0.95, 0.025)]
    cfg = load_config(["ensemble.vote=majority"])
    final = reconcile(vote(tables, labels, "majority"), tables, labels, reconcile_policy(cfg))
    assert final["pred"].tolist() == ["A"]
    assert reconcile_policy(load_config([])) == "soft"
    explicit = load_config(["ensemble.vote=majority", "ensemble.reconcile=confident"])
    assert reconcile_policy(explicit) == "confident"
