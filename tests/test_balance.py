"""Class-balanced resampling of a fold's training split."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest

from vlmexp.balance import resample


@pytest.fixture
def split() -> pd.DataFrame:
    counts = {"a": 40, "b": 10, "c": 3}
    rows = [
        {"id": f"{k}{i}", "label": k, "image": f"{k}{i}.png"} for k, n in counts.items() for i in range(n)
    ]
    return pd.DataFrame(rows)


def _only_input_ids(out: pd.DataFrame, inp: pd.DataFrame) -> None:
    assert set(out["id"]) <= set(inp["id"])
    # each output row is an exact copy of an input row (label and image travel with the id)
    assert (
        (out.set_index("id")[["label", "image"]] == inp.set_index("id").loc[out["id"], ["label", "image"]])
        .all()
        .all()
    )


def test_oversample(split):
    out, before, after = resample(split, "oversample", seed=0)
    assert before == {"a": 40, "b": 10, "c": 3}
    assert after == {"a": 40, "b": 40, "c": 40}
    _only_input_ids(out, split)
    assert set(out["id"]) == set(split["id"])  # every original kept
    # even repetition: c's 3 images appear 13 or 14 times each (40 = 13*3 + 1)
    assert sorted(Counter(out.loc[out["label"] == "c", "id"]).values()) == [13, 13, 14]


def test_sqrt(split):
    out, _, after = resample(split, "sqrt", seed=0)
    assert after == {"a": 40, "b": 20, "c": round(math.sqrt(3 * 40))}
    assert set(out["id"]) == set(split["id"])
    _only_input_ids(out, split)


def test_undersample(split):
    out, _, after = resample(split, "undersample", seed=0)
    assert after == {"a": 10, "b": 10, "c": 3}  # down to max(min count 3, floor 10)
    assert out["id"].is_unique
    _only_input_ids(out, split)
    _, _, after2 = resample(split, "undersample", seed=0, floor=1)
    assert after2 == {"a": 3, "b": 3, "c": 3}


def test_deterministic_and_none(split):
    a, _, _ = resample(split, "oversample", seed=7)
    b, _, _ = resample(split, "oversample", seed=7)
    c, _, _ = resample(split, "oversample", seed=8)
    assert a["id"].tolist() == b["id"].tolist()
    assert a["id"].tolist() != c["id"].tolist()
    same, before, after = resample(split, "none", seed=0)
    assert same.equals(split) and before == after
    with pytest.raises(ValueError, match="choose one of"):
        resample(split, "smote", seed=0)
