"""model.head=cls: pooling, probabilities, learning an easy task, save/load and export round trips, and a
2-fold `exp run` whose tables vote with a head=lm run through `exp ensemble`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmexp.config import load_config
from vlmexp.engine.cls_head import pool_hidden
from vlmexp.tables import prob_columns, read_json, read_table

LABELS = ["red", "blue"]
FAST = ["folds=2", "train.epochs=1", "train.eval=false", "train.batch_size=8", "predict.batch_size=16"]


def test_last_pool_picks_the_last_prompt_token_for_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert pool_hidden(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool_hidden(hidden, right, "last").flatten().tolist() == [2.0, 5.0]
    # mean leaves padding out: row 0 of `right` averages positions 0..2 = (0+1+2)/3
    assert pool_hidden(hidden, right, "mean").flatten().tolist() == [1.0, 4.5]


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> Path:
    """Two classes anyone can tell apart: reddish vs bluish squares (shades vary)."""
    root = tmp_path_factory.mktemp("colors")
    (root / "img").mkdir()
    (root / "labels.json").write_text(json.dumps({"red": "a red picture", "blue": "a blue picture"}))
    rng = np.random.default_rng(0)
    rows = {"train": [], "test": []}
    for split, n in (("train", 32), ("test", 8)):
        for i in range(n):
            label = LABELS[i % 2]
            shade = int(rng.integers(150, 256))
            colour = (shade, 30, 30) if label == "red" else (30, 30, shade)
            Image.new("RGB", (56, 56), colour).save(root / "img" / f"{split}{i}.png")
            rows[split].append({"id": f"{split}{i}", "image": f"img/{split}{i}.png", "label": label})
    pd.DataFrame(rows["train"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(rows["test"]).drop(columns="label").to_csv(root / "test.csv", index=False)
    return root


def _cfg(comp: Path, work: Path, *extra: str):
    return load_config(
        [
            *FAST,
            f"data.dir={comp}",
            f"runs_dir={work / 'runs'}",
            f"model.cache_dir={work / 'tiny'}",
            f"leaderboard={work / 'leaderboard.csv'}",
            *extra,
        ]
    )


def _probs(df: pd.DataFrame) -> np.ndarray:
    return df[prob_columns(LABELS)].to_numpy()


@pytest.fixture(scope="module")
def trained(comp, tmp_path_factory):
    """One head=cls fold trained on all 32 rows; the model in memory and its predictions."""
    from transformers import set_seed

    from vlmexp.engine.predict import predict
    from vlmexp.engine.train import train_fold
    from vlmexp.models.load import load_model
    from vlmexp.recipe import prepare

    work = tmp_path_factory.mktemp("work")
    cfg = _cfg(comp, work, "model.head=cls", "train.epochs=8", "train.lr=5e-3", "name=head")
    exp = prepare(cfg)
    samples = exp.samples(exp.train, True)
    set_seed(0)
    model = load_model(cfg, training=True)
    result = train_fold(cfg, model, exp.processor, samples, [], LABELS, work / "fold")
    table = predict(cfg, model, exp.processor, samples, LABELS, progress=False)
    return cfg, exp, samples, result, table, work


def test_head_probabilities_sum_to_one_and_training_learns_the_task(trained):
    _, exp, _, result, table, _ = trained
    assert np.allclose(_probs(table).sum(1), 1.0, atol=1e-5)
    assert list(table.columns[:2]) == ["id", "pred"]
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0] * 0.7, losses
    accuracy = float((table["pred"].to_numpy() == exp.train["label"].to_numpy()).mean())
    assert accuracy >= 0.9, accuracy


def test_adapter_and_head_round_trip_through_save_load(trained):
    from vlmexp.engine.predict import predict
    from vlmexp.models.load import load_for_inference

    cfg, exp, samples, result, table, _ = trained
    assert (result.adapter_dir / "cls_head.safetensors").is_file()
    model = load_for_inference(cfg, result.adapter_dir)
    again = predict(cfg, model, exp.processor, samples, LABELS, progress=False)
    np.testing.assert_allclose(_probs(again), _probs(table), atol=1e-5)


def test_export_keeps_the_head_and_predicts_the_same(trained):
    from vlmexp.engine.predict import predict
    from vlmexp.models.export import export_merged
    from vlmexp.models.load import load_for_inference

    cfg, exp, samples, result, table, work = trained
    out = export_merged(cfg, result.adapter_dir, work / "export")["out_dir"]
    merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=out))
    model = load_for_inference(merged_cfg)
    again = predict(merged_cfg, model, exp.processor, samples, LABELS, progress=False)
    np.testing.assert_allclose(_probs(again), _probs(table), atol=1e-4)


def test_lm_model_without_head_fails_loud_for_head_runs(trained, tiny_models):
    from vlmexp.models.load import load_for_inference

    cfg, *_ = trained
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(tiny_models("qwen2_vl"))))
    with pytest.raises(FileNotFoundError, match="cls_head.safetensors"):
        load_for_inference(plain)


@pytest.mark.slow
def test_two_fold_head_run_finishes_and_votes_with_an_lm_run(comp, tmp_path):
    from typer.testing import CliRunner

    from vlmexp.cli import app
    from vlmexp.recipe import run_experiment

    head = run_experiment(_cfg(comp, tmp_path, "model.head=cls", "model.head_pool=mean", "name=cls"))
    lm = run_experiment(_cfg(comp, tmp_path, "name=lm"))
    for run in (head, lm):
        assert read_json(run.cv_path)["mean"] is not None
        sub = read_table(run.root / "submission.csv")
        assert len(sub) == 8 and set(sub["label"]) <= set(LABELS)
    oof = read_table(head.root / "oof.csv")
    assert np.allclose(_probs(oof).sum(1), 1.0, atol=1e-5) and len(oof) == 32

    # `exp serve` answers each fold with its own adapter and head: the served vote equals the folds' vote
    _serve_equals_fold_vote(head.root)

    out = tmp_path / "runs" / "both"
    args = ["ensemble", str(head.root), str(lm.root), f"leaderboard={tmp_path / 'leaderboard.csv'}"]
    res = CliRunner().invoke(app, [*args, "--name", "both", "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    mean = sum(_probs(read_table(r.root / "test_probs.csv")) for r in (head, lm)) / 2
    np.testing.assert_allclose(_probs(read_table(out / "test_probs.csv")), mean, atol=1e-6)
    assert (out / "submission.csv").is_file()


def _serve_equals_fold_vote(root: Path) -> None:
    from vlmexp.data import load_competition
    from vlmexp.engine.samples import build_samples
    from vlmexp.kfold.ensemble import vote
    from vlmexp.prompts.render import load_template
    from vlmexp.rundir import RunDir
    from vlmexp.serve import RunPredictor

    predictor = RunPredictor(root)
    cfg = predictor.cfg
    comp = load_competition(cfg.data)
    samples = build_samples(comp.test, labels=comp.labels, descriptions=comp.descriptions,
                            template=load_template(cfg.prompt), cfg=cfg, with_answer=False)  # fmt: skip
    folds = [read_table(RunDir(root).fold_dir(k) / "test.csv") for k in range(2)]
    assert not np.allclose(_probs(folds[0]), _probs(folds[1]))  # the folds' heads differ
    local = _probs(vote(folds, LABELS, how=cfg.ensemble.vote))
    served = np.array([list(predictor.answer(s)[1].values()) for s in samples])
    np.testing.assert_allclose(served, local, atol=1e-5)


def test_best_checkpoint_and_a_rerun_carry_the_head(comp, tmp_path):
    """With validation on, the fold keeps its best checkpoint's adapter and head; a rerun of a trained
    fold reloads both (not a fresh head)."""
    from transformers import set_seed

    from vlmexp.engine.predict import predict
    from vlmexp.engine.train import train_fold
    from vlmexp.models.load import load_for_inference, load_model
    from vlmexp.recipe import prepare

    cfg = _cfg(comp, tmp_path, "model.head=cls", "train.epochs=2", "train.eval=true", "name=best")
    exp = prepare(cfg)
    samples = exp.samples(exp.train, True)
    train, val = samples[:24], exp.samples(exp.train.iloc[24:], False)
    tables = []
    for _ in range(2):  # the second call finds the fold trained and reuses it
        set_seed(0)
        model = load_model(cfg, training=True)
        result = train_fold(cfg, model, exp.processor, train, val, LABELS, tmp_path / "fold")
        tables.append(predict(cfg, model, exp.processor, val, LABELS, progress=False))
    assert result.best_metric is not None
    reloaded = load_for_inference(cfg, result.adapter_dir)
    saved = predict(cfg, reloaded, exp.processor, val, LABELS, progress=False)
    np.testing.assert_allclose(_probs(tables[0]), _probs(saved), atol=1e-5)
    np.testing.assert_allclose(_probs(tables[1]), _probs(saved), atol=1e-5)


def test_average_folds_averages_the_heads_too(comp, tmp_path):
    """`exp export --average-folds` on head=cls folds: the averaged folder's head is the mean of the
    folds' heads, not a copy of fold 0's."""
    from safetensors.torch import load_file

    from vlmexp.engine.cls_head import WEIGHTS, new_head, save_head
    from vlmexp.models.average import average_adapters
    from vlmexp.models.load import load_model

    cfg = _cfg(comp, tmp_path, "model.head=cls")
    folds = []
    for k in range(2):
        torch.manual_seed(k)
        model = load_model(cfg, training=True)
        new_head(cfg, model, LABELS)
        model.save_pretrained(tmp_path / f"fold{k}")
        save_head(model, tmp_path / f"fold{k}")
        folds.append(tmp_path / f"fold{k}")
    out = average_adapters(folds, tmp_path / "avg")
    heads = [load_file(str(f / WEIGHTS)) for f in folds]
    got = load_file(str(out / WEIGHTS))
    for key in heads[0]:
        assert not torch.allclose(heads[0][key], heads[1][key])
        torch.testing.assert_close(got[key], (heads[0][key] + heads[1][key]) / 2)
