"""The data layer's guarantees: content fingerprints refuse mixed data, NA-looking labels stay labels,
multi-image rows load, every file a run reads is checked before fold 0 (issues 10 and 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

from vlmexp.config import Config, ConfigError, DataConfig, config_hash, load_config
from vlmexp.data import (
    DataError,
    check_competition,
    image_paths,
    load_competition,
)
from vlmexp.data_check import format_check
from vlmexp.demo import make_demo
from vlmexp.fingerprint import competition_fingerprint, fingerprint_changes
from vlmexp.kfold.folds import FoldError, assign_folds, check_oof_ids
from vlmexp.metrics import score
from vlmexp.rundir import RunDir
from vlmexp.submit import make_submission
from vlmexp.tables import read_table, write_table


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo", seed=5, n_train=60, n_test=20)


@pytest.fixture
def comp(tmp_path, demo) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "comp"))


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# -- fingerprint: an edited competition is refused on resume, saying what changed -----------


def test_fingerprint_says_what_changed(comp):
    before = competition_fingerprint(DataConfig(dir=str(comp)))
    assert before == competition_fingerprint(DataConfig(dir=str(comp)))  # stable
    assert fingerprint_changes(before, before) == []
    train = read(comp / "train.csv")
    train.iloc[:-10].to_csv(comp / "train.csv", index=False)
    Image.new("RGB", (33, 33)).save(comp / train.loc[0, "image"])
    after = competition_fingerprint(DataConfig(dir=str(comp)))
    assert after["digest"] != before["digest"]
    changes = fingerprint_changes(before, after)
    assert "train.csv changed: 10 rows fewer (60 -> 50)" in changes
    assert any(c.startswith("images changed: 1 of") and train.loc[0, "image"] in c for c in changes)


def test_resume_with_edited_data_is_refused(comp, tmp_path):
    cfg = Config(data=DataConfig(dir=str(comp)), runs_dir=str(tmp_path / "runs"), name="r")
    run = RunDir.for_config(cfg)
    prov = run.start(cfg, {}, fingerprint=competition_fingerprint(cfg.data))
    assert prov["data_fingerprint"]["digest"]
    run.start(cfg, {}, fingerprint=competition_fingerprint(cfg.data))  # same data: resumes
    train = read(comp / "train.csv")
    train.iloc[:-10].to_csv(comp / "train.csv", index=False)
    with pytest.raises(ConfigError, match=r"(?s)train.csv changed: 10 rows fewer.*name=.*--force"):
        run.start(cfg, {}, fingerprint=competition_fingerprint(cfg.data))


def test_reused_folds_must_match_the_data(comp, tmp_path):
    c = load_competition(DataConfig(dir=str(comp)))
    fp = competition_fingerprint(DataConfig(dir=str(comp)))
    assign_folds(c.train, 3, 1, tmp_path, fingerprint=fp)
    [stored] = tmp_path.glob("folds-*.csv")
    assert json.loads(stored.with_suffix(".json").read_text())["fingerprint"]["digest"] == fp["digest"]
    # An extra id in the stored file (edited by hand, or the data behind it changed): refused.
    df = read(stored)
    pd.concat([df, pd.DataFrame({"id": ["ghost"], "fold": ["0"]})]).to_csv(stored, index=False)
    with pytest.raises(FoldError, match="ghost"):
        assign_folds(c.train, 3, 1, tmp_path, fingerprint=fp)


def test_oof_ids_exactly_the_training_ids_once_each():
    check_oof_ids(pd.Series(["a", "b", "c"]), ["c", "b", "a"])
    with pytest.raises(ValueError, match=r"(?s)repeated.*'a'.*not in the training data.*'z'.*never.*'c'"):
        check_oof_ids(pd.Series(["a", "a", "b", "z"]), ["a", "b", "c"])


def test_answers_csv_is_not_part_of_the_run_hash():
    a = load_config(["data.answers_csv=test_answers.csv"])
    b = load_config(["data.answers_csv=other.csv"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(["data.limit=3"]))


# -- NA-looking labels: "None", "N/A", "NA", "null" are labels, not missing values -----------

NA_LABELS = ["None", "N/A", "NA", "null"]


@pytest.fixture
def na_comp(tmp_path) -> Path:
    root = tmp_path / "na"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "label": NA_LABELS[i % 4]})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": ["NA", "null"], "image": ["img/0.png", "img/1.png"]}).to_csv(
        root / "test.csv", index=False
    )
    (root / "labels.json").write_text(json.dumps({x: f"class {x}" for x in NA_LABELS}))
    pd.DataFrame({"id": ["NA", "null"], "label": ["None", "N/A"]}).to_csv(root / "answers.csv", index=False)
    return root


def test_na_looking_labels_round_trip(na_comp, tmp_path):
    c = load_competition(DataConfig(dir=str(na_comp)))
    assert sorted(set(c.train["label"])) == sorted(NA_LABELS)
    oof = pd.DataFrame({"id": c.train["id"], "label": c.train["label"], "fold": 0, "pred": c.train["label"]})
    write_table(oof, tmp_path / "oof.csv")
    back = read_table(tmp_path / "oof.csv")
    assert list(back["label"]) == list(c.train["label"]) and list(back["pred"]) == list(c.train["label"])
    assert score(back["label"], back["pred"], c.labels)["accuracy"] == 1.0
    run = tmp_path / "run"
    write_table(pd.DataFrame({"id": ["NA", "null"], "pred": ["None", "null"]}), run / "test_probs.csv")
    sub = make_submission(run, list(c.test["id"]), c.labels)
    assert read(sub).to_dict("list") == {"id": ["NA", "null"], "label": ["None", "null"]}
    # An empty pred cell is still missing: code that skips unpredicted rows relies on it.
    write_table(pd.DataFrame({"id": ["x"], "pred": [""]}), tmp_path / "empty.csv")
    assert read_table(tmp_path / "empty.csv")["pred"].isna().all()


def test_answers_scored_as_strings_and_only_on_predicted_rows(na_comp, tmp_path):
    from vlmexp.recipe import _score_answers

    cfg = Config(data=DataConfig(dir=str(na_comp), answers_csv="answers.csv"))
    exp = SimpleNamespace(labels=NA_LABELS, run=RunDir(tmp_path / "run"))
    # Only "NA" was predicted (e.g. data.limit=1): "null" must not count as a wrong answer.
    final = pd.DataFrame({"id": ["NA"], "pred": ["None"]})
    got = _score_answers(cfg, exp, final, majority="None")
    assert got["test_accuracy"] == 1.0
    assert json.loads((tmp_path / "run" / "test_score.json").read_text())["test_rows"] == 1


# -- multi-image rows --------------------------------------------------------------------


def test_multi_image_rows_load_and_are_checked(comp):
    train = read(comp / "train.csv")
    first, second = train.loc[0, "image"], train.loc[1, "image"]
    train.loc[0, "image"] = f"{first}|{second}"
    train.loc[2, "image"] = f"{first}|images/nope.png"
    train.to_csv(comp / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv row 3: image not found: images/nope.png"):
        load_competition(DataConfig(dir=str(comp)))
    train.loc[2, "image"] = second + " | " + first  # spaces around the separator are fine
    train.to_csv(comp / "train.csv", index=False)
    c = load_competition(DataConfig(dir=str(comp)), check_images=True)
    parts = image_paths(c.train.loc[0, "image"])
    assert parts == [str(comp / first), str(comp / second)]
    assert c.train.loc[0, "id"] == f"{first}|{second}"


# -- every problem before fold 0 -----------------------------------------------------------


def test_one_class_labels_json_is_refused(comp):
    (comp / "labels.json").write_text(json.dumps({"only": "the one class"}))
    result = check_competition(comp)
    assert any("at least 2 classes" in p.message for p in result.problems)


def test_too_small_classes_for_the_folds_are_named():
    train = pd.DataFrame({"id": [f"{c}{i}" for c in "ab" for i in range(3)], "label": list("aaabbb")})
    with pytest.raises(FoldError, match=r"(?s)a \(3\), b \(3\).*folds=3.*merge"):
        assign_folds(train, 5, 1, Path("/nonexistent-never-written"))


def test_preflight_lists_every_problem_at_once(comp, tmp_path):
    from vlmexp.data import preflight

    train = read(comp / "train.csv")
    (comp / train.loc[4, "image"]).write_bytes(b"not a png")
    (comp / train.loc[7, "image"]).write_bytes(b"")
    cfg = load_config(
        [
            f"data.dir={comp}",
            "data.answers_csv=no_answers.csv",
            f"train.mix_dataset={tmp_path / 'mix.jsonl'}",
            "train.mix_ratio=0.1",
            "pseudo.source=no_such_run",
            f"runs_dir={tmp_path / 'runs'}",
        ]
    )
    with pytest.raises(DataError) as e:
        preflight(cfg)
    text = str(e.value)
    for needle in ("train.csv row 5: cannot decode", "train.csv row 8: cannot decode", "no_answers.csv"):
        assert needle in text
    assert "mix.jsonl" in text and "no_such_run" in text and "data.answers_csv" in text


def test_preflight_checks_answer_columns(comp):
    from vlmexp.data import preflight

    pd.DataFrame({"ident": ["x"], "label": ["y"]}).to_csv(comp / "bad_answers.csv", index=False)
    cfg = load_config([f"data.dir={comp}", "data.answers_csv=bad_answers.csv"])
    with pytest.raises(DataError, match=r"bad_answers.csv: missing column 'id'"):
        preflight(cfg)
    cfg = load_config([f"data.dir={comp}", "data.answers_csv=test_answers.csv"])
    assert len(preflight(cfg).train) == 60


def test_train_limit_keeps_the_whole_test_set(comp):
    c = load_competition(DataConfig(dir=str(comp), train_limit=7))
    assert len(c.train) == 7 and len(c.test) == 20


def test_check_names_the_group_column_and_counts_train_images_only(comp):
    train = read(comp / "train.csv")
    train["group"] = [f"g{i // 3}" for i in range(len(train))]
    train.to_csv(comp / "train.csv", index=False)
    test = read(comp / "test.csv")
    for name in list(test["image"][:3]):
        Image.new("RGB", (100, 80)).save(comp / name)  # small test images only
    Image.new("RGB", (100, 80)).save(comp / train.loc[0, "image"])
    result = check_competition(comp)
    assert result.groups == 20
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(format_check(result))
    assert "group column 'group'" in console.export_text()
    small = {w.file: w.message for w in result.warnings if "under 300" in w.message}
    assert small["train.csv"].startswith("1 images") and small["test.csv"].startswith("3 images")


@pytest.mark.slow
def test_prepare_refuses_to_resume_on_edited_data_and_another_answers_file_resumes(comp, tmp_path):
    from vlmexp.recipe import prepare

    base = [f"data.dir={comp}", f"runs_dir={tmp_path / 'runs'}", f"model.cache_dir={tmp_path / 'tiny'}"]
    exp = prepare(load_config([*base, "folds=2", "data.answers_csv=test_answers.csv"]))
    assert exp.prov["data_fingerprint"]["files"]["train.csv"]["rows"] == 60
    # Only the answers scored differ: the same folder resumes (no fold is trained again).
    other = load_config([*base, "folds=2", "data.answers_csv="])
    assert RunDir.for_config(other).root == exp.run.root
    train = read(comp / "train.csv")
    train.iloc[:-10].to_csv(comp / "train.csv", index=False)
    with pytest.raises(ConfigError, match=r"train.csv changed: 10 rows fewer \(60 -> 50\)"):
        prepare(other)


def test_cli_data_check_lists_run_files_and_submit_names_data_limit(comp, tmp_path):
    from typer.testing import CliRunner

    from vlmexp.cli import app
    from vlmexp.config import to_yaml

    runner = CliRunner()
    got = runner.invoke(app, ["data", "check", str(comp), "data.answers_csv=nope.csv"])
    assert got.exit_code == 1 and "nope.csv" in got.output
    # A run made with data.limit=5 predicted 5 test rows; the sample asks for all 20.
    cfg = load_config([f"data.dir={comp}", "data.limit=5"])
    run = tmp_path / "runs" / "smoke"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "cv.json").write_text("{}")
    test = read(comp / "test.csv").head(5)
    write_table(pd.DataFrame({"id": test["id"], "pred": cfg_label(comp)}), run / "test_probs.csv")
    got = runner.invoke(app, ["submit", str(run), "--sample", str(comp / "sample_submission.csv")])
    assert got.exit_code == 2, got.output
    assert "data.limit=5" in got.output and "data.train_limit" in got.output
    # Without --sample too: checked against the whole test.csv, not the 5 rows the run read.
    got = runner.invoke(app, ["submit", str(run), "--out", str(tmp_path / "sub.csv")])
    assert got.exit_code == 2, got.output
    assert "15 of 20 test ids have no prediction" in got.output and "data.limit=5" in got.output
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.slow
def test_a_run_that_cut_the_test_set_writes_no_submission(comp, tmp_path):
    """data.limit=16 predicts 16 of the 20 test rows: a submission.csv of them would look submittable."""
    from vlmexp.recipe import run_experiment
    from vlmexp.tables import read_json

    run = run_experiment(tiny_run_config(comp, tmp_path, "data.limit=16")).root
    assert len(read_table(run / "test_probs.csv")) == 16
    assert not (run / "submission.csv").exists()
    assert read_json(run / "leaderboard_row.json")["submission"] == ""


def tiny_run_config(data: Path, tmp_path: Path, *extra: str):
    """A 2-fold, 1-epoch tiny-model run of `data` with everything it writes under `tmp_path`."""
    return load_config(
        [
            f"data.dir={data}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.cache_dir={tmp_path / 'tiny'}",
            f"leaderboard={tmp_path / 'leaderboard.csv'}",
            "folds=2",
            "train.epochs=1",
            "train.eval=false",
            "train.batch_size=8",
            "predict.batch_size=16",
            *extra,
        ]
    )


def cfg_label(comp: Path) -> str:
    return next(iter(json.loads((comp / "labels.json").read_text())))


def test_suspect_labels_keep_digit_and_na_labels(tmp_path):
    sus = pd.DataFrame(
        {"id": ["a", "b"], "label": ["1", "None"], "suggested": ["2", "NA"], "confidence": [0.95, 0.9]}
    )
    write_table(sus, tmp_path / "suspect_labels.csv")
    back = read_table(tmp_path / "suspect_labels.csv")
    assert list(back["suggested"]) == ["2", "NA"] and list(back["label"]) == ["1", "None"]


@pytest.mark.slow
def test_na_looking_labels_through_a_tiny_run(na_comp, tmp_path):
    from vlmexp.recipe import run_experiment
    from vlmexp.tables import read_json

    run = run_experiment(tiny_run_config(na_comp, tmp_path, "data.answers_csv=answers.csv")).root
    oof = read_table(run / "oof.csv")
    assert sorted(oof["label"]) == sorted(NA_LABELS * 2)  # no label read back as missing
    assert oof["pred"].isin(NA_LABELS).all()
    cv = read_json(run / "cv.json")
    assert cv["accuracy"] == pytest.approx((oof["label"] == oof["pred"]).mean())
    sub = read(run / "submission.csv")
    assert list(sub["id"]) == ["NA", "null"] and sub["label"].isin(NA_LABELS).all()
    assert read_json(run / "test_score.json")["test_rows"] == 2


def test_a_source_run_of_another_competition_is_named_before_the_run(comp, tmp_path):
    """pseudo.source / ensemble.rerun_from naming a run made on other labels or another test set once
    failed mid-start with a traceback from pseudolabel/select.py."""
    from vlmexp.data import check_competition

    runs = tmp_path / "runs"
    other = runs / "other"
    other.mkdir(parents=True)
    (other / "cv.json").write_text("{}")
    write_table(pd.DataFrame({"id": ["z1"], "pred": ["cat"], "p:cat": [1.0]}), other / "test_probs.csv")
    cfg = load_config([f"data.dir={comp}", f"runs_dir={runs}", "pseudo.source=other"])
    result = check_competition(cfg.data, cfg)
    [problem] = [p for p in result.problems if p.file == "pseudo.source"]
    assert "was made with other labels" in problem.message and "this competition" in problem.fix
    labels = list(json.loads((comp / "labels.json").read_text()))
    probs = {f"p:{lab}": [1.0 / len(labels)] for lab in labels}
    write_table(pd.DataFrame({"id": ["z1"], "pred": [labels[0]], **probs}), other / "test_probs.csv")
    cfg = load_config(
        [f"data.dir={comp}", f"runs_dir={runs}", "ensemble.reconcile=rerun", "ensemble.rerun_from=other"]
    )
    [problem] = [p for p in check_competition(cfg.data, cfg).problems if p.file == "ensemble.rerun_from"]
    assert "predicted none of this test set's ids" in problem.message
