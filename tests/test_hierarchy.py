"""Two-level labels (issue 13): a nested labels.json trains and scores on full paths parent/child,
prompts show the tree, cv.json and the leaderboard report per-level scores, `exp demo --hierarchy`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmexp.data import check_competition, load_competition
from vlmexp.demo import PARENTS, make_demo
from vlmexp.metrics import level_scores
from vlmexp.prompts import load_template, parse_answer, render_sample

TREE = {"上衣": ["上衣/T恤", "上衣/衬衫"], "裤子": ["裤子/短裤"]}


def _comp(tmp_path: Path, labels: object, rows: list[str], sep: str = "/") -> Path:
    """A competition folder with one 8x8 image per train row and nested (or flat) labels.json."""
    root = tmp_path / "comp"
    (root / "img").mkdir(parents=True)
    for i in range(len(rows)):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / "img" / f"{i}.png")
    (root / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    pd.DataFrame({"image": [f"img/{i}.png" for i in range(len(rows))], "label": rows}).to_csv(
        root / "train.csv", index=False
    )
    pd.DataFrame({"id": ["t0"], "image": ["img/0.png"]}).to_csv(root / "test.csv", index=False)
    return root


NESTED = {"上衣": {"T恤": "short sleeves", "衬衫": "buttons"}, "裤子": {"短裤": "above the knee"}}


def test_nested_labels_json_loads_as_full_path_labels_with_the_tree(tmp_path):
    comp = load_competition(_comp(tmp_path, NESTED, ["上衣/T恤", "裤子/短裤", "上衣/衬衫"]))
    assert comp.labels == ["上衣/T恤", "上衣/衬衫", "裤子/短裤"]  # class order: parents, then children
    assert comp.tree == TREE
    assert comp.descriptions["裤子/短裤"] == "above the knee"
    assert comp.train["label"].tolist() == ["上衣/T恤", "裤子/短裤", "上衣/衬衫"]


def test_flat_labels_have_no_tree(tmp_path):
    comp = load_competition(_comp(tmp_path, {"a": "x", "b": "y"}, ["a", "b"]))
    assert comp.tree == {} and comp.labels == ["a", "b"]


def test_separator_is_configurable(tmp_path):
    from vlmexp.config import DataConfig

    root = _comp(tmp_path, {"a/b": {"c": "x", "d": "y"}}, ["a/b::c", "a/b::d"])
    comp = load_competition(DataConfig(dir=str(root), hierarchy_sep="::"))
    assert comp.tree == {"a/b": ["a/b::c", "a/b::d"]}


def test_names_holding_the_separator_and_mixed_levels_are_refused(tmp_path):
    bad = {"上衣": {"T恤/长袖": "x", "衬衫": "y", " ": "w"}, "裤/子": {"短裤": "z"}}
    result = check_competition(_comp(tmp_path / "a", bad, ["上衣/衬衫"]))
    messages = [p.message for p in result.problems]
    assert any("child name 'T恤/长袖' contains the hierarchy separator '/'" in m for m in messages)
    assert any("parent name '裤/子'" in m for m in messages)
    assert "an empty child name under '上衣'" in messages
    mixed = check_competition(_comp(tmp_path / "b", {"上衣": {"T恤": "x"}, "shoes": "y"}, ["shoes"]))
    assert any("mixes flat labels (shoes)" in p.message for p in mixed.problems)


def test_a_parent_column_makes_child_labels_full_paths(tmp_path):
    from vlmexp.config import DataConfig

    root = _comp(tmp_path, NESTED, ["T恤", "上衣/衬衫", "短裤", "短裤"])
    train = pd.read_csv(root / "train.csv").assign(category1=["上衣", "上衣", "裤子", "上衣"])
    train.to_csv(root / "train.csv", index=False)
    cfg = DataConfig(dir=str(root), parent_col="category1")
    result = check_competition(cfg)  # row 4: 短裤 is no child of 上衣
    assert [(p.row, p.message) for p in result.problems] == [(4, "label '上衣/短裤' is not in labels.json")]
    train.iloc[:3].to_csv(root / "train.csv", index=False)
    comp = load_competition(cfg)
    assert comp.train["label"].tolist() == ["上衣/T恤", "上衣/衬衫", "裤子/短裤"]
    assert comp.train["category1"].tolist() == ["上衣", "上衣", "裤子"]


def test_a_child_name_alone_in_train_csv_is_told_its_full_path(tmp_path):
    result = check_competition(_comp(tmp_path, NESTED, ["上衣/T恤", "衬衫"]))
    (problem,) = result.problems
    assert (problem.file, problem.row) == ("train.csv", 2)
    assert "without its parent" in problem.message and "上衣/衬衫" in problem.fix


def test_level_scores_on_a_constructed_example():
    true = ["上衣/T恤", "上衣/T恤", "上衣/衬衫", "裤子/短裤"]
    pred = ["上衣/T恤", "上衣/衬衫", "上衣/衬衫", None]  # a sibling mix-up, then an unparsed answer
    got = level_scores(true, pred, TREE)
    # level 1: 上衣 right 3 times, 裤子 unparsed -> 3/4; F1(上衣) = 1 (P = R = 1), F1(裤子) = 0 -> 0.5.
    assert got["level1"] == {"accuracy": 0.75, "macro_f1": 0.5}
    # level 2: right at rows 1 and 3 -> 0.5; F1: T恤 P=1 R=.5 -> 2/3, 衬衫 P=.5 R=1 -> 2/3, 短裤 0.
    assert got["level2"]["accuracy"] == 0.5
    assert got["level2"]["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_a_parent_or_child_alone_never_parses_as_a_label():
    labels = [label for children in TREE.values() for label in children]
    assert parse_answer("上衣/衬衫", labels, "") == "上衣/衬衫"
    assert parse_answer("上衣", labels, "") is None and parse_answer("衬衫", labels, "") is None


def test_hierarchy_template_shows_the_tree_and_answers_the_full_path():
    labels = [label for children in TREE.values() for label in children]
    descriptions = {"上衣/T恤": "short sleeves", "上衣/衬衫": "", "裤子/短裤": "above the knee"}
    tpl = load_template("hierarchy")
    r = render_sample(tpl, labels=labels, descriptions=descriptions, row={"label": "裤子/短裤"}, tree=TREE)
    assert "上衣:\n- 上衣/T恤: short sleeves\n- 上衣/衬衫\n裤子:\n- 裤子/短裤: above the knee" in r.user
    assert (r.marker, r.answer) == ("", "裤子/短裤")
    row = {"label": "裤子/短裤"}
    flat = render_sample(tpl, labels=labels, descriptions=descriptions, row=row)
    base = render_sample(load_template("baseline"), labels=labels, descriptions={}, row=row)
    assert (flat.user, flat.answer) == (base.user, base.answer)  # flat labels: baseline's prompt


def test_label_tree_json_holds_the_tree_with_descriptions(tmp_path):
    (tmp_path / "tree_json.jinja").write_text(
        '{% extends "baseline.jinja" %}{% block labels_section %}{{ label_tree_json }}{% endblock %}'
    )
    labels = [label for children in TREE.values() for label in children]
    descriptions = {"上衣/T恤": "short sleeves", "裤子/短裤": "above the knee"}
    tpl = load_template("tree_json", str(tmp_path))
    r = render_sample(tpl, labels=labels, descriptions=descriptions, row={"label": "上衣/T恤"}, tree=TREE)
    blob = r.user[r.user.index("{") : r.user.rindex("}") + 1]
    assert json.loads(blob) == {
        "上衣": {"上衣/T恤": "short sleeves", "上衣/衬衫": ""},
        "裤子": {"裤子/短裤": "above the knee"},
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("h") / "demo", seed=3, n_train=24, n_test=12, hierarchy=True)


def test_demo_variant_loads_with_its_tree_and_same_images_as_the_flat_demo(demo, tmp_path):
    comp = load_competition(demo)
    assert list(comp.tree) == list(PARENTS) and len(comp.labels) == 12
    assert all(label.split("/")[1] in PARENTS[label.split("/")[0]] for label in comp.labels)
    assert set(comp.train["label"]) <= set(comp.labels)
    flat = make_demo(tmp_path / "flat", seed=3, n_train=24, n_test=12)
    assert (flat / "images/train_0007.png").read_bytes() == (demo / "images/train_0007.png").read_bytes()
    flat_labels = pd.read_csv(flat / "train.csv")["label"]
    assert [label.split("/", 1)[1] for label in comp.train["label"]] == flat_labels.tolist()


def test_exp_demo_hierarchy_then_data_check_passes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmexp import demo as demo_mod
    from vlmexp.cli import app

    real = demo_mod.make_demo
    # The command writes 400+200 images; the same call at 24+12 keeps the test fast.
    monkeypatch.setattr(demo_mod, "make_demo", lambda out, **kw: real(out, n_train=24, n_test=12, **kw))
    runner = CliRunner()
    out = tmp_path / "demo_h"
    made = runner.invoke(app, ["demo", "--hierarchy", str(out)])
    assert made.exit_code == 0, made.output
    assert isinstance(json.loads((out / "labels.json").read_text())["money"], dict)
    # With the run's options: the answers file's full-path labels are checked against the tree too.
    checked = runner.invoke(app, ["data", "check", str(out), "data.answers_csv=test_answers.csv"])
    assert checked.exit_code == 0, checked.output
    assert "4 parents of 12 classes" in checked.output and "OK: no problems" in checked.output


def test_label_scoring_on_a_tiny_model_names_only_known_full_paths(demo, tiny_models):
    """Every candidate is a full path, so the argmax is one: a child always comes with its own parent."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmexp.config import Config
    from vlmexp.engine.predict import predict
    from vlmexp.engine.samples import build_samples
    from vlmexp.tables import prob_columns

    comp = load_competition(demo)
    cfg = Config()
    cfg.image.resize = 56
    cfg.predict.batch_size = 6
    path = tiny_models("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = build_samples(
        comp.test.head(6),
        labels=comp.labels,
        descriptions=comp.descriptions,
        template=load_template("hierarchy"),
        cfg=cfg,
        with_answer=False,
        tree=comp.tree,
    )
    assert "browse:\n- browse/product_photo" in samples[0]["rendered"].user
    table = predict(cfg, model, processor, samples, comp.labels, progress=False)
    assert list(table.columns[2:]) == prob_columns(comp.labels)  # one probability per full path
    np.testing.assert_allclose(table[prob_columns(comp.labels)].sum(axis=1), 1.0, atol=1e-5)
    assert set(table["pred"]) <= set(comp.labels)
    parents = {label: p for p, children in comp.tree.items() for label in children}
    assert all(pred.split("/")[0] == parents[pred] for pred in table["pred"])


def test_finalize_writes_per_level_scores_to_cv_json_and_the_leaderboard(tmp_path, finished_folds):
    from vlmexp import leaderboard
    from vlmexp.config import load_config
    from vlmexp.recipe import finalize
    from vlmexp.tables import read_json

    labels = [label for children in TREE.values() for label in children]
    gold = ["上衣/T恤", "上衣/T恤", "上衣/衬衫", "裤子/短裤"] * 2
    pred = ["上衣/T恤", "上衣/衬衫", "上衣/衬衫", "裤子/短裤"] * 2
    cfg = load_config(
        ["folds=2", "name=h", f"runs_dir={tmp_path / 'runs'}", f"leaderboard={tmp_path / 'lb.csv'}"]
    )
    exp = finished_folds(cfg, labels, gold, pred, ["上衣/T恤"], tree=TREE)
    run = exp.run
    finalize(exp, started=0.0)
    cv = read_json(run.cv_path)
    assert cv["levels"] == level_scores(gold, pred, TREE)
    assert cv["levels"]["level1"]["accuracy"] == 1.0 and cv["levels"]["level2"]["accuracy"] == 0.75
    row = leaderboard.load(tmp_path / "lb.csv").iloc[0]
    assert row["level1_accuracy"] == 1.0 and row["level2_accuracy"] == 0.75
    assert row["level2_macro_f1"] == pytest.approx(round(cv["levels"]["level2"]["macro_f1"], 4))
