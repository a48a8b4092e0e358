"""Pseudo-label selection; pseudo rows only ever train."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmexp.pseudolabel.select import add_pseudo, select_pseudo, split_with_pseudo

LABELS = ["x", "y"]


def _ensemble() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": ["001", "002", "003", "004"],
            "pred": ["x", "y", "x", "y"],
            "p:x": [0.95, 0.02, 0.7, 0.08],
            "p:y": [0.05, 0.98, 0.3, 0.92],
            "agree": [1.0, 1.0, 1.0, 0.8],
        }
    )


def test_select():
    sel = select_pseudo(_ensemble(), LABELS, min_agree=1.0, min_confidence=0.9)
    assert list(sel["id"]) == ["002", "001"]  # 003 not confident, 004 not unanimous
    assert list(sel["label"]) == ["y", "x"]
    assert sel["confidence"].tolist() == pytest.approx([0.98, 0.95])
    assert sel["pseudo"].all()
    assert len(select_pseudo(_ensemble(), LABELS, min_agree=0.8, min_confidence=0.9)) == 3


def test_add_and_split():
    train = pd.DataFrame(
        {"id": ["001", "a2", "a3", "a4"], "image": ["t1", "t2", "t3", "t4"], "label": ["x", "y", "x", "y"]}
    )
    test = pd.DataFrame({"id": ["001", "002", "003", "004"], "image": ["s1", "s2", "s3", "s4"]})
    pseudo = select_pseudo(_ensemble(), LABELS, min_agree=1.0, min_confidence=0.9)
    both = add_pseudo(train, test, pseudo)
    assert len(both) == 6 and both["pseudo"].tolist() == [False] * 4 + [True] * 2
    assert both["id"].is_unique  # test id "001" equals a train id; prefixed
    extra = both[both["pseudo"]].set_index("id")
    assert extra.loc["pseudo:002", "image"] == "s2" and extra.loc["pseudo:002", "label"] == "y"
    folds = pd.Series([0, 1, 0, 1], index=["001", "a2", "a3", "a4"])
    for k in (0, 1):
        tr, va = split_with_pseudo(both, folds, k)
        assert not va["pseudo"].any()
        assert set(va["id"]) == set(folds.index[folds == k])
        assert {"pseudo:001", "pseudo:002"} <= set(tr["id"])
        assert set(tr["id"]) & set(va["id"]) == set()
        assert len(tr) + len(va) == len(both)
    plain = add_pseudo(train, test, pd.DataFrame())
    assert plain["id"].tolist() == train["id"].tolist() and not plain["pseudo"].any()
    with pytest.raises(ValueError, match="not test ids"):
        add_pseudo(train, test.iloc[:1], pseudo)
    with pytest.raises(ValueError, match="have no fold"):
        split_with_pseudo(both, folds.iloc[:3], 0)
