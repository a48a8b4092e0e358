"""Today's families (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Gemma 3, Gemma 4) through what is specific to
them: the turn layout (Qwen3.5's non-thinking form), the answer-only mask, think blocks in generated
text, which speed levers apply, and a 2-fold run end to end. The family-parametrised tests elsewhere
(test_models_lora/export/tiny, test_engine_encode/predict) cover them with the older four."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmexp.config import Config, load_config
from vlmexp.engine import vision_cache, vision_speed
from vlmexp.engine.predict import _cut_at_marker, after_think
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.engine.train import training_dataset
from vlmexp.engine.trainer import build_trainer
from vlmexp.models.load import load_model, load_processor
from vlmexp.models.tiny_recent import RECENT_FAMILIES
from vlmexp.prompts.render import load_template

LABELS = ["red", "green", "label_a", "退款页面"]
# (generation prompt ends with, lead, end of turn) as each hub template lays out an answer
TURNS = {
    "qwen3_vl": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    "qwen3_vl_moe": ("<|im_start|>assistant\n", "", "<|im_end|>"),
    # non-thinking: the empty think block is part of the prompt, the answer follows at once
    "qwen3_5": ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "", "<|im_end|>"),
    "gemma3": ("<start_of_turn>model\n", "", "<end_of_turn>"),
    "gemma4": ("<|turn>model\n", "", "<turn|>"),
}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    d = tmp_path_factory.mktemp("fam")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        arr = rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append({"id": str(i), "image": str(d / f"{i}.png"), "label": LABELS[i], "reason": "a red tag."})
    return pd.DataFrame(rows)


def _cfg(tiny_models, family: str) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    cfg.lora.r, cfg.lora.dropout = 4, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.eval = 1.0, 4, False
    return cfg


def _samples(df, cfg, prompt="baseline", with_answer=True):
    return build_samples(
        df, labels=LABELS, descriptions={}, template=load_template(prompt), cfg=cfg, with_answer=with_answer
    )


@pytest.mark.parametrize("family", RECENT_FAMILIES)
def test_turn_layout_is_the_non_thinking_one(family, tiny_models, table):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    turn = split_turn(processor, _samples(table[:1], cfg, with_answer=False)[0]["messages"])
    ends, lead, eot = TURNS[family]
    assert turn.prompt.endswith(ends)
    assert (turn.lead, turn.eot) == (lead, eot)
    # the thinking switch is passed only to templates that read it: Qwen3.5's and Gemma 4's
    thinking = "<think>\n" if family == "qwen3_5" else "<|think|>"
    assert (thinking in processor.apply_chat_template([{"role": "user", "content": "x"}], **_on())) == (
        family in ("qwen3_5", "gemma4")
    )


def _on() -> dict:
    return {"add_generation_prompt": True, "tokenize": False, "enable_thinking": True}


@pytest.mark.parametrize("family", RECENT_FAMILIES)
def test_only_the_answer_and_end_of_turn_are_supervised(family, tiny_models, table, tmp_path):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    samples = _samples(table[:2], cfg) + _samples(table[2:4], cfg, prompt="reason_label")
    model = load_model(cfg, training=True)
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(samples))])
    tok = processor.tokenizer
    for i, sample in enumerate(samples):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        supervised = labels != -100
        answer = sample["messages"][-1]["content"][0]["text"]
        turn = split_turn(processor, sample["messages"][:-1])
        want = tok(turn.completion(answer), add_special_tokens=False)["input_ids"]
        assert ids[supervised].tolist() == want, tok.decode(ids[supervised])
        assert torch.equal(labels[supervised], ids[supervised])
        # one contiguous run ending at the row's last real token; the think block is prompt
        where = supervised.nonzero().flatten()
        assert where.tolist() == list(range(where[0], where[-1] + 1))
        assert where[-1] == batch["attention_mask"][i].nonzero().max()
        assert "think" not in tok.decode(ids[supervised])


def test_generated_think_blocks_are_skipped():
    marker = "Label: "
    # a thought that mentions the marker is not where the label is scored
    text = "<think>Label: red? no.</think>\n\nReason: a green tag.\nLabel: green"
    assert (
        _cut_at_marker(text, marker, "") == "<think>Label: red? no.</think>\n\nReason: a green tag.\nLabel: "
    )
    assert _cut_at_marker("Reason: a tag.\nLabel: red", marker, "") == "Reason: a tag.\nLabel: "
    assert after_think("<think>red or blue?</think>\n\nblue") == "\n\nblue"
    assert after_think("blue") == "blue"


@pytest.mark.parametrize("family", ["gemma4"])
def test_vision_cache_is_off_with_a_reason_where_the_forward_takes_no_features(family, tiny_models, caplog):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    assert "takes no precomputed image features" in vision_cache.vision_cache_unsupported(model)
    caches = RunCaches.for_run(cfg, processor)
    with caplog.at_level(logging.INFO, logger="vlmexp.engine.run_caches"):
        assert caches.vision_for(model) is None and caches.vision_for(model, training=False) is None
    assert sum("vision_cache=auto" in r.message for r in caplog.records) == 1  # said once, not per call
    cfg.speed.vision_cache = "on"
    with pytest.raises(ValueError, match="speed.vision_cache=on.*takes no precomputed image features"):
        RunCaches.for_run(cfg, processor).vision_for(model)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma3"])
def test_vision_cache_serves_the_qwen3_and_gemma3_towers(family, tiny_models):
    cfg = _cfg(tiny_models, family)
    model = load_model(cfg, training=True)
    assert vision_cache.vision_cache_unsupported(model) is None
    assert RunCaches.for_run(cfg, load_processor(cfg)).vision_for(model) is not None


@pytest.mark.parametrize("family", ["qwen2_5_vl", *RECENT_FAMILIES])
def test_window_patch_only_where_the_tower_has_windows(family, tiny_models):
    # Qwen2.5-VL's tower attends within windows; Qwen3-VL/3.5 attend over each whole image, Gemma's
    # SigLIP towers over the whole image too: nothing to batch there
    model = load_model(_cfg(tiny_models, family), training=False)
    assert vision_speed.patch_vision_attention(model) == (1 if family == "qwen2_5_vl" else 0)


# -- a K-fold run end to end, one per family --------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from vlmexp.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=24, n_test=12)


@pytest.mark.slow
@pytest.mark.parametrize("family", RECENT_FAMILIES)
def test_two_fold_run_finishes(family, demo, tmp_path):
    from vlmexp.recipe import run_experiment
    from vlmexp.tables import read_json, read_table

    cfg = load_config(
        [
            f"model.name=tiny:{family}",
            "folds=2",
            "train.epochs=1",
            "train.eval=false",
            "train.batch_size=8",
            "predict.batch_size=8",
            f"data.dir={demo}",
            f"runs_dir={tmp_path / 'runs'}",
            f"model.cache_dir={tmp_path / 'tiny'}",
            f"leaderboard={tmp_path / 'leaderboard.csv'}",
        ]
    )
    root = run_experiment(cfg).root
    oof = read_table(root / "oof.csv")
    train = pd.read_csv(demo / "train.csv")
    assert sorted(oof["id"].astype(str)) == sorted(train.iloc[:, 0].astype(str))  # each row once, out of fold
    assert (root / "folds" / "fold1" / "done.json").exists()
    assert 0.0 <= read_json(root / "cv.json")["accuracy"] <= 1.0
