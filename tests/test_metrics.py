"""Accuracy, macro-F1, per-class report, confusion; missing predictions count as wrong."""

from __future__ import annotations

import numpy as np
import pytest

from vlmexp.metrics import confusion, per_class_report, score

LABELS = ["cat", "dog", "bird"]


def test_score_by_hand():
    y = ["cat", "cat", "dog", "dog", "bird", "bird"]
    p = ["cat", "dog", "dog", "dog", "bird", "cat"]
    s = score(y, p, LABELS)
    assert s["accuracy"] == pytest.approx(4 / 6)
    # cat: P=1/2 R=1/2 F=1/2; dog: P=2/3 R=1 F=0.8; bird: P=1 R=1/2 F=2/3
    assert s["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert s["n"] == 6 and s["unparsed"] == 0


def test_missing_predictions_are_wrong():
    y = ["cat", "dog", "bird", "bird"]
    p = ["cat", None, np.nan, "bird"]
    s = score(y, p, LABELS)
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["unparsed"] == 2
    # cat F=1, dog: no TP -> 0, bird: P=1 R=1/2 -> 2/3
    assert s["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_per_class_and_confusion():
    y = ["cat", "cat", "dog", "bird"]
    p = ["cat", "dog", "dog", None]
    rep = per_class_report(y, p, LABELS)
    assert list(rep.index) == LABELS and list(rep.reset_index().columns)[0] == "label"
    assert rep.loc["cat", "recall"] == pytest.approx(0.5)
    assert rep.loc["dog", "precision"] == pytest.approx(0.5)
    assert list(rep["support"]) == [2, 1, 1]
    cm = confusion(y, p, LABELS)
    assert list(cm.index) == LABELS and list(cm.columns) == [*LABELS, "(unparsed)"]
    assert cm.loc["cat", "dog"] == 1 and cm.loc["bird", "(unparsed)"] == 1
    assert cm.sum(axis=1).tolist() == [2, 1, 1]
    assert list(confusion(y, ["cat"] * 4, LABELS).columns) == LABELS
