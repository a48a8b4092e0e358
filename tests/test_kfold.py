"""Stored, shared, stratified (grouped) fold assignment."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from vlmexp.kfold.folds import FoldError, assign_folds, fold_path


def _train(n_per_class: dict[str, int], groups: bool = False) -> pd.DataFrame:
    rows = []
    for label, n in n_per_class.items():
        for i in range(n):
            rows.append({"id": f"{label}-{i:03d}", "label": label})
    df = pd.DataFrame(rows)
    if groups:
        df["group"] = [f"g{i // 2}" for i in range(len(df))]  # pairs of consecutive rows
    return df


def test_stratified_and_stored(tmp_path):
    train = _train({"a": 20, "b": 10, "c": 5})
    folds = assign_folds(train, k=5, seed=1, store_dir=tmp_path)
    assert list(folds.index) == list(train["id"])
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    # Stratified: every class spreads evenly, a 20-member class puts exactly 4 into each fold.
    per = pd.crosstab(train.set_index("id")["label"], folds)
    assert (per.loc["a"] == 4).all() and (per.loc["b"] == 2).all() and (per.loc["c"] == 1).all()
    path = fold_path(train, 5, 1, tmp_path)
    assert path.exists() and path.name.startswith("folds-") and path.name.endswith("-k5-s1.csv")


def test_reused_regardless_of_row_order(tmp_path):
    train = _train({"a": 12, "b": 8})
    first = assign_folds(train, k=4, seed=3, store_dir=tmp_path)
    shuffled = train.sample(frac=1.0, random_state=0).reset_index(drop=True)
    again = assign_folds(shuffled, k=4, seed=3, store_dir=tmp_path)
    assert len(list(tmp_path.glob("folds-*.csv"))) == 1
    assert again.loc[first.index].tolist() == first.tolist()
    # The stored file is what is read back: editing it changes the answer.
    path = fold_path(train, 4, 3, tmp_path)
    stored = pd.read_csv(path, dtype={"id": str})
    stored["fold"] = 0
    stored.to_csv(path, index=False)
    assert set(assign_folds(train, k=4, seed=3, store_dir=tmp_path)) == {0}


def test_other_seed_or_data_other_file(tmp_path):
    train = _train({"a": 12, "b": 8})
    a = assign_folds(train, k=4, seed=3, store_dir=tmp_path)
    b = assign_folds(train, k=4, seed=4, store_dir=tmp_path)
    relabeled = train.assign(label=["b"] + list(train["label"][1:]))
    assign_folds(relabeled, k=4, seed=3, store_dir=tmp_path)
    assert len(list(tmp_path.glob("folds-*.csv"))) == 3
    assert a.tolist() != b.tolist()


def test_groups_never_straddle(tmp_path):
    train = _train({"a": 16, "b": 12}, groups=True)
    folds = assign_folds(train, k=3, seed=0, store_dir=tmp_path)
    by_group = pd.DataFrame({"group": train["group"].to_numpy(), "fold": folds.to_numpy()})
    assert (by_group.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(folds.unique()) == [0, 1, 2]


def test_rare_class_warns_but_works(tmp_path):
    train = _train({"a": 10, "b": 10, "rare": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = assign_folds(train, k=5, seed=0, store_dir=tmp_path)
    msgs = [str(w.message) for w in caught]
    assert any("rare (2)" in m and "use folds=2 or fewer" in m for m in msgs), msgs
    assert len(folds) == len(train) and sorted(folds.unique()) == [0, 1, 2, 3, 4]


def test_a_one_row_class_at_two_folds_is_not_told_to_use_two_folds(tmp_path):
    """folds=2 is the least there is; the fix said "use folds=2 or fewer" to a run at folds=2."""
    train = _train({"a": 10, "b": 10, "single": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assign_folds(train, k=2, seed=0, store_dir=tmp_path)
    [msg] = [str(w.message) for w in caught if "single (1)" in str(w.message)]
    assert "use folds=" not in msg and "add rows to those classes" in msg


def test_too_many_folds_and_bad_input(tmp_path):
    train = _train({"a": 2, "b": 1})
    with pytest.raises(FoldError, match="only 3 training rows"):
        assign_folds(train, k=5, seed=0, store_dir=tmp_path)
    dup = pd.DataFrame({"id": ["x", "x", "y"], "label": ["a", "b", "a"]})
    with pytest.raises(FoldError, match="unique"):
        assign_folds(dup, k=2, seed=0, store_dir=tmp_path)
    few_groups = _train({"a": 4}, groups=True)  # 2 groups
    with pytest.raises(FoldError, match="only 2 groups"):
        assign_folds(few_groups, k=3, seed=0, store_dir=tmp_path)
