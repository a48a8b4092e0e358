"""ensemble.suspects=relabel|drop changes what the folds train on, never what they are scored on."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.tables import read_json, read_table, write_json, write_table

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("how", ["relabel", "drop"])
def test_suspect_labels_change_training_not_the_cv_labels(tmp_path, how):
    from vlmexp.recipe import run_experiment

    data = make_demo(tmp_path / "data", seed=2, n_train=24, n_test=12)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    labels = list(read_json(data / "labels.json"))
    runs = tmp_path / "runs"
    # A source run that "learned" one class: it calls every row of another class suspect (20 of 24).
    src = runs / "src"
    src.mkdir(parents=True)
    write_json({"metric": "macro_f1", "mean": 0.0}, src / "cv.json")
    ids = [f"images/train_{i + 1:04d}.png" for i in range(len(train))]  # no id column: the image path
    others = [i for i, lab in zip(ids, train["label"], strict=True) if lab != labels[0]][:20]
    sus = pd.DataFrame({"id": others, "label": "x", "suggested": labels[0], "confidence": 0.99})
    write_table(sus, src / "suspect_labels.csv")
    cfg = load_config(
        [f"data.dir={data}", f"runs_dir={runs}", f"leaderboard={tmp_path / 'lb.csv'}",
         f"model.cache_dir={tmp_path / 'tiny'}", "folds=2", "train.epochs=1", "train.eval=false",
         "predict.batch_size=16", f"ensemble.suspects={how}", "ensemble.suspects_from=src"]
    )  # fmt: skip
    run = run_experiment(cfg).root
    oof = read_table(run / "oof.csv").set_index("id")
    truth = dict(zip(ids, train["label"], strict=True))
    assert len(oof) == len(train)  # every row validated, dropped or not
    assert oof["label"].to_dict() == truth  # scored on the labels as given
    before = [read_json(run / f"folds/fold{k}/class_counts.json")["before"] for k in range(2)]
    trained = sum(sum(b.values()) for b in before)
    if how == "relabel":
        assert trained == len(train) and sum(b.get(labels[0], 0) for b in before) >= 20
    else:
        assert trained == len(train) - 20
