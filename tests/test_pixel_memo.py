"""engine/pixel_memo.py: the memo answers as the image processor does and computes an image again only
where its pixels are needed or the setting differs; rows encoded through it equal plain rows; a whole
run computes each image once and equals a run without it, loss for loss and probability for probability."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers.image_utils import make_flat_list_of_images
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from vlmexp.config import Config, load_config
from vlmexp.engine import vision_prepass
from vlmexp.engine.encode import Encoder, image_key
from vlmexp.engine.pixel_memo import PixelMemo
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.engine.train import training_dataset
from vlmexp.models import tiny
from vlmexp.models.load import load_model, load_processor
from vlmexp.prompts.render import load_template

LABELS = ["red", "green", "label_a", "label_b"]
GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5")
PT = {"return_tensors": "pt"}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """Six rows of four image sizes (height x width: 48x48 and 56x48 share the tiny Qwen grid 4x4);
    row 5 repeats row 0's image."""
    d = tmp_path_factory.mktemp("memo")
    rng = np.random.default_rng(1)
    sizes = [(48, 48), (56, 48), (40, 48), (48, 64), (48, 48)]
    rows = []
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"id": str(i), "image": str(d / f"{i}.png"), "label": LABELS[i % 4]})
    rows.append({"id": "5", "image": str(d / "0.png"), "label": LABELS[1]})
    return pd.DataFrame(rows)


def _cfg(tiny_models, family: str) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    return cfg


def _samples(df, cfg, with_answer=True):
    tpl = load_template("baseline")
    return build_samples(df, labels=LABELS, descriptions={}, template=tpl, cfg=cfg, with_answer=with_answer)


def _images(table, cfg) -> list[Image.Image]:
    return [s["images"][0] for s in _samples(table[:5], cfg)]  # five distinct images


def _nan(t: torch.Tensor) -> bool:
    return bool(t.isnan().all())


def test_the_memo_answers_as_the_image_processor_and_computes_each_image_once(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    real = load_processor(cfg).image_processor
    a, b, c, d, _ = _images(table, cfg)
    memo = PixelMemo(real, image_key, spare=lambda key: True)  # no caller reads a known image's pixels

    got, want = memo([a, b], **PT), real([a, b], **PT)
    assert type(got) is type(want) and list(got) == list(want) == ["pixel_values", "image_grid_thw"]
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert (memo.calls, memo.computed, memo.hits) == (1, 2, 0)

    # c is new, b and a are known: c alone is computed, in the call's order between NaN stand-ins
    got, want = memo([b, c, a], **PT), real([b, c, a], **PT)
    assert (memo.calls, memo.computed, memo.hits) == (2, 3, 2)
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert got["pixel_values"].dtype == want["pixel_values"].dtype
    b_rows, c_rows, a_rows = got["pixel_values"].split(want["image_grid_thw"].prod(-1).tolist())
    c_want = real([c], **PT)["pixel_values"]
    assert torch.equal(c_rows, c_want) and not c_rows.isnan().any()
    assert _nan(b_rows) and _nan(a_rows)

    # every image known, nested as the processor passes a row's images: no call at all
    got = memo([[a], [c]], **PT)
    assert memo.calls == 2 and memo.hits == 4
    assert torch.equal(got["image_grid_thw"], real([a, c], **PT)["image_grid_thw"])
    assert got["pixel_values"].shape == real([a, c], **PT)["pixel_values"].shape and _nan(got["pixel_values"])

    # a caller that reads the pixels (the pre-pass): every image computed, real pixels
    assert torch.equal(memo.fresh([a, d], **PT)["pixel_values"], real([a, d], **PT)["pixel_values"])
    assert memo.calls == 3 and memo.computed == 5


def test_an_image_whose_pixels_are_needed_is_computed_again(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    real = load_processor(cfg).image_processor
    a, b, *_ = _images(table, cfg)
    needed = {image_key(a)}
    memo = PixelMemo(real, image_key, spare=lambda key: key not in needed)
    memo.fresh([a, b], **PT)
    got = memo([a, b], **PT)
    assert memo.computed == 3 and memo.hits == 1  # a again, b from the memo
    a_rows, b_rows = got["pixel_values"].split(got["image_grid_thw"].prod(-1).tolist())
    assert torch.equal(a_rows, real([a], **PT)["pixel_values"]) and _nan(b_rows)


def test_another_setting_never_hits(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    real = load_processor(cfg).image_processor
    images = _images(table, cfg)
    memo = PixelMemo(real, image_key, spare=lambda key: True)
    memo(images, **PT)
    # Same grids, other pixels; then other grids (112 px minimum: 8x8 patches instead of 4x4)
    settings = [{"do_normalize": False}, {"size": {"shortest_edge": 112 * 112, "longest_edge": 224 * 224}}]
    for n, setting in enumerate(settings, start=2):
        got, want = memo(images, **PT, **setting), real(images, **PT, **setting)
        assert memo.calls == n and memo.hits == 0
        for key in want:
            assert torch.equal(got[key], want[key]), (setting, key)
    assert memo(images, **PT)["image_grid_thw"].prod(-1).tolist() == [16, 16, 24, 16, 16]
    assert memo.calls == 3 and memo.hits == len(images)  # the first setting is still known
    # a call the memo cannot key (numpy arrays, not PIL images) goes through as it is
    arrays = [np.array(im) for im in images[:2]]
    assert torch.equal(memo(arrays, **PT)["pixel_values"], real(arrays, **PT)["pixel_values"])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_rows_through_the_memo_equal_plain_rows(family, tiny_models, table):
    """After a pre-pass whose features were cached for three of the five images (forget_pixels), rows
    encoded through the memo equal plain rows in every tensor; the pixels kept are the same, and none
    for a cached image. A grid model computes each image once, plus once more for each image whose
    pixels a row still needs; any other model's image processor sees every call as it was."""
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    model = load_model(cfg, training=False)
    plain, fast = Encoder(processor, 2048), Encoder(processor, 2048, memo=True)
    for enc in (plain, fast):
        enc.bind(model)
    samples, prompts = _samples(table, cfg), _samples(table, cfg, with_answer=False)
    keys = list(dict.fromkeys(fast.key(s["images"][0]) for s in samples))
    assert len(keys) == 5
    grid = family in GRID_FAMILIES
    if grid:  # the pre-pass: every image through the memo, then three images' features cached
        vision_prepass.image_inputs(processor, [s["images"][0] for s in samples[:5]], memo=fast.memo)
    cached = keys[:3]
    for enc in (plain, fast):
        enc.forget_pixels(cached)

    pairs = []
    for example in training_dataset(cfg, processor, samples):
        pairs.append((plain.train_row(example), fast.train_row(example)))
    for s in prompts:
        prompt = split_turn(processor, s["messages"]).prompt
        pairs.append(tuple(enc.prompt_row(prompt, s["images"], [5, 6]) for enc in (plain, fast)))
    for want, got in pairs:
        assert want.keys() == got.keys()
        assert want["image_keys"] == got["image_keys"]
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[name], value), name
        for name, value in (want.get("media") or {}).items():
            assert torch.equal(got["media"][name], value), name
    if grid:
        assert "position_ids" in pairs[0][1] and "image_grid_thw" in pairs[0][1]
    assert plain.pixels.keys() == fast.pixels.keys()
    assert not set(cached) & fast.pixels.keys()
    for key, pix in plain.pixels.items():
        assert torch.equal(fast.pixels[key], pix) and not pix.isnan().any(), key
    if grid:
        assert fast.memo.grid_model and fast.memo.computed == 5 + 2  # the two uncached images again
        assert fast.memo.hits == fast.misses - 2  # every other encoded row found its image
    else:
        assert fast.memo.grid_model is False and fast.memo.hits == 0


def test_no_memo_without_a_feature_cache(tiny_models):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    processor = load_processor(cfg)
    assert RunCaches.for_run(cfg, processor).encoder.memo is not None
    cfg.speed.vision_cache = "off"
    caches = RunCaches.for_run(cfg, processor)
    assert caches.encoder.memo is None and caches.encoder._row_processor is processor


# -- a 2-fold run with and without the memo -----------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlmexp.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=24, n_test=12)


@pytest.mark.slow
def test_a_run_computes_each_image_once_and_equals_a_run_without_the_memo(demo, tmp_path, monkeypatch):
    from vlmexp import recipe

    computed: Counter = Counter()  # image key -> images the real image processor took
    fold_results, predictions = [], []
    real_call, for_run = Qwen2VLImageProcessor.__call__, RunCaches.for_run.__func__
    train_fold, predict = recipe.train_fold, recipe._predict

    def count(self, images, *args, **kwargs):
        computed.update(image_key(im) for im in make_flat_list_of_images(images))
        return real_call(self, images, *args, **kwargs)

    def caches(cls, cfg, processor, memo=True):
        made = for_run(cls, cfg, processor)
        if not memo:
            made.encoder = Encoder(processor, cfg.train.max_length)
        return made

    def record_fold(*args, **kwargs):
        fold_results.append(train_fold(*args, **kwargs))
        return fold_results[-1]

    def record_predict(*args, **kwargs):
        predictions.append(predict(*args, **kwargs))
        return predictions[-1]

    monkeypatch.setattr(Qwen2VLImageProcessor, "__call__", count)
    monkeypatch.setattr(recipe, "train_fold", record_fold)
    monkeypatch.setattr(recipe, "_predict", record_predict)

    def run(memo: bool) -> tuple[list, list]:
        monkeypatch.setattr(
            recipe.RunCaches, "for_run", classmethod(lambda cls, c, p: caches(cls, c, p, memo))
        )
        computed.clear(), fold_results.clear(), predictions.clear()
        cfg = load_config(
            [
                "model.name=tiny:qwen2_5_vl",
                "folds=2",
                "train.epochs=1",
                "train.eval=true",
                "train.batch_size=4",
                "train.logging_steps=1",
                "predict.batch_size=8",
                f"name=memo-{memo}",
                f"data.dir={demo}",
                f"runs_dir={tmp_path / 'runs'}",
                f"model.cache_dir={tmp_path / 'tiny'}",
                f"leaderboard={tmp_path / 'leaderboard.csv'}",
            ]
        )
        recipe.run_experiment(cfg)
        losses = [[e["loss"] for e in r.log_history if "loss" in e] for r in fold_results]
        tables = [r.val_table for r in fold_results] + list(predictions)
        return losses, tables

    plain_losses, plain_tables = run(memo=False)
    assert len(computed) == 24 + 12 and max(computed.values()) > 1  # training images: 3 times each
    losses, tables = run(memo=True)
    assert len(computed) == 24 + 12 and set(computed.values()) == {1}
    assert len(losses) == 2 and all(losses) and losses == plain_losses
    assert len(tables) == len(plain_tables) == 4  # OOF (validation) and test, per fold
    for got, want in zip(tables, plain_tables, strict=True):
        pd.testing.assert_frame_equal(got, want, check_exact=True)
