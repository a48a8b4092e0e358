"""The demo competition: deterministic bytes, imbalanced classes, consistent files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlmexp.data import check_competition
from vlmexp.demo import make_demo


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("full") / "demo")  # the default 400 train / 200 test


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = snapshot(make_demo(tmp_path / "a", seed=1, n_train=40, n_test=20))
    b = snapshot(make_demo(tmp_path / "b", seed=1, n_train=40, n_test=20))
    c = snapshot(make_demo(tmp_path / "c", seed=2, n_train=40, n_test=20))
    assert len(a) == 40 + 20 + 6  # images + train, test, answers, sample, labels.json, README
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.csv"] != c["train.csv"]
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) == 60  # every image differs


def test_classes_and_imbalance(demo):
    labels = json.loads((demo / "labels.json").read_text(encoding="utf-8"))
    assert len(labels) >= 10
    assert all(isinstance(d, str) and d.endswith(".") for d in labels.values())
    counts = read(demo / "train.csv")["label"].value_counts()
    assert set(counts.index) == set(labels)
    assert counts.max() / counts.min() >= 4
    assert (counts >= 60).sum() >= 3  # common classes
    assert ((counts >= 8) & (counts <= 15)).sum() >= 2  # rare classes


def test_files_agree(demo):
    labels = json.loads((demo / "labels.json").read_text(encoding="utf-8"))
    train, test = read(demo / "train.csv"), read(demo / "test.csv")
    answers, sample = read(demo / "test_answers.csv"), read(demo / "sample_submission.csv")
    assert list(train.columns) == ["image", "label", "reason"]
    assert list(test.columns) == ["id", "image"] and len(train) == 400 and len(test) == 200
    assert set(answers["id"]) == set(test["id"]) and answers["id"].is_unique
    assert set(answers["label"]) == set(labels)  # every class appears in test too
    assert list(sample["id"]) == list(test["id"]) and set(sample["label"]) <= set(labels)
    assert (train["reason"].str.len() > 10).all()
    assert train["reason"].nunique() > len(train) / 2  # varied wording, not one sentence per class
    assert not set(train["image"]) & set(test["image"])


def test_image_sizes_and_data_check(demo):
    sizes = [Image.open(demo / p).size for p in read(demo / "train.csv")["image"]]
    assert all(320 <= w <= 480 and 320 <= h <= 480 for w, h in sizes)
    assert len(set(sizes)) > 50  # sizes vary
    result = check_competition(demo)
    assert result.ok, result.problems
    assert not [w for w in result.warnings if "longest side" in w.message]
    assert result.imbalance_ratio >= 4


def test_rebuild_smaller_removes_stale_images(tmp_path):
    out = make_demo(tmp_path / "d", n_train=40, n_test=20)
    make_demo(out, n_train=30, n_test=12)
    assert len(list((out / "images").glob("*.png"))) == 42
    assert check_competition(out).ok


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.csv").write_text("image,label\n")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "train.csv").read_text() == "image,label\n"
