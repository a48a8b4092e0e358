"""engine/vision_prepass.py: the pre-pass computes the pixels a row keeps and the features the lazy path
computes, so training and prediction then miss nothing; a whole run gives the same tables with and
without it, with every image through the tower once; a full cache budget stops it quietly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmexp.config import Config, load_config
from vlmexp.engine import vision_prepass
from vlmexp.engine.encode import Encoder, image_key
from vlmexp.engine.predict import predict
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.engine.train import train_fold, training_dataset
from vlmexp.models.load import load_model, load_processor
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns, read_table

LABELS = ["red", "green", "label_a", "label_b"]
GRID_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """Nine rows: three image sizes, 48x48 and 56x48 px one patch grid in the tiny processors (4x4),
    40x48 px another (4x6); row 8 repeats row 0's image, so the pre-pass meets a duplicate."""
    d = tmp_path_factory.mktemp("prepass")
    rng = np.random.default_rng(0)
    sizes = [(48, 48), (56, 48), (40, 48)]  # (height, width)
    rows = []
    for i in range(9):
        path = d / f"{i}.png"
        if i < 8:
            arr = rng.integers(0, 255, (*sizes[i % 3], 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
        else:
            path = d / "0.png"
        rows.append({"id": str(i), "image": str(path), "label": LABELS[i % 4]})
    return pd.DataFrame(rows)


def _cfg(tiny_models, family: str) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    cfg.lora.r, cfg.lora.dropout = 8, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.logging_steps = 1.0, 4, 1
    cfg.train.warmup_ratio, cfg.train.eval = 0.0, False
    cfg.predict.batch_size = 3
    return cfg


def _samples(df, cfg, with_answer=True):
    tpl = load_template("baseline")
    return build_samples(df, labels=LABELS, descriptions={}, template=tpl, cfg=cfg, with_answer=with_answer)


@pytest.mark.parametrize("family", GRID_FAMILIES)
def test_prepass_pixels_equal_the_rows_pixels(family, tiny_models, table):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    images = [s["images"][0] for s in samples]
    got = vision_prepass.image_inputs(processor, images)  # one call over every size, as a batch
    sizes = got["image_grid_thw"].prod(-1).tolist()
    prepass = dict(zip(map(image_key, images), got["pixel_values"].split(sizes), strict=True))
    assert len({tuple(g) for g in got["image_grid_thw"].tolist()}) == 2

    train_enc = Encoder(processor, cfg.train.max_length)
    for example in training_dataset(cfg, processor, samples):
        train_enc.train_row(example)
    prompt_enc = Encoder(processor, cfg.train.max_length)
    for s in _samples(table, cfg, with_answer=False):
        prompt_enc.prompt_row(split_turn(processor, s["messages"]).prompt, s["images"])
    assert train_enc.pixels.keys() == prompt_enc.pixels.keys() == prepass.keys()
    assert len(prepass) == 8  # row 8 repeats row 0's image
    for key, pix in prepass.items():
        assert torch.equal(train_enc.pixels[key], pix), key
        assert torch.equal(prompt_enc.pixels[key], pix), key
    # the grouping's guess from the image size alone is the grid the processor gives
    guesses = [vision_prepass.grid_guess(processor.image_processor, im) for im in images]
    assert guesses == [tuple(g[1:]) for g in got["image_grid_thw"].tolist()]


# Qwen3-VL's tower also hands deepstack levels to the decoder
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_after_the_prepass_training_and_prediction_miss_nothing(family, tiny_models, table, tmp_path):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    caches = RunCaches.for_run(cfg, processor)
    samples, prompts = _samples(table, cfg), _samples(table, cfg, with_answer=False)
    cache = caches.vision_for(model)
    assert cache is not None
    images = vision_prepass.fold_images(cfg, samples, [], prompts)
    counts = vision_prepass.encode_images(
        model, processor, images, cache, max_images=2, progress=False, encoder=caches.encoder
    )
    # 8 distinct images: 6 of grid 4x4 (two pixel sizes), 2 of grid 4x6; at most 2 a call: 3 + 1 calls
    assert counts == {"images": 8, "calls": 4, "sizes": 2, "budget_full": False}
    assert len(cache) == cache.misses == 8
    prepass_feats = {k: cache._store[k] for k in cache.keys()}

    train_fold(cfg, model, processor, samples, [], LABELS, tmp_path, caches=caches)
    got = predict(cfg, model, processor, prompts, LABELS, progress=False, caches=caches)
    assert cache.misses == 8 and cache.hits >= 2 * 9  # an epoch and a prediction, nothing new computed
    assert not caches.encoder.pixels  # the rows' pixels were let go: their features are cached

    # The lazy path on the same (frozen) tower: features computed inside mixed-size batches
    lazy = RunCaches.for_run(cfg, processor)
    assert lazy.vision_for(model) is not None
    model.eval()
    want = predict(cfg, model, processor, prompts, LABELS, progress=False, caches=lazy)
    assert lazy.vision.misses == 8
    for key, feats in prepass_feats.items():
        assert len(feats) == (2 if family == "qwen3_vl" else 1)
        for a, b in zip(feats, lazy.vision._store[key], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    cols = prob_columns(LABELS)
    np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)


def test_a_full_cache_budget_stops_the_prepass(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    # 1073 bytes: one image's features fit (4x4 patches merged 2x2 = 4 tokens x 64 fp32 = 1024 bytes), two not
    cfg.speed.vision_cache_gib = 1e-6
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    caches = RunCaches.for_run(cfg, processor)
    images = vision_prepass.fold_images(cfg, _samples(table, cfg), [], [])
    counts = vision_prepass.encode_images(model, processor, images, caches.vision_for(model), max_images=2)
    assert counts["budget_full"] and counts["calls"] == 1 and counts["images"] == 2
    assert len(caches.vision) == 1

    cfg.speed.vision_cache_gib = 0.0  # nothing fits: no tower call at all
    caches = RunCaches.for_run(cfg, processor)
    counts = vision_prepass.encode_images(model, processor, images, caches.vision_for(model), progress=False)
    assert counts == {"images": 0, "calls": 0, "sizes": 0, "budget_full": True}


def test_the_next_batch_pixels_are_built_while_the_tower_runs(tiny_models, table, monkeypatch):
    """The image processor for batch j+1 runs in a worker thread during batch j's tower call: the tower
    call here waits until the next batch's pixels have started, which a loop that builds them after
    the call would never do (the wait would time out)."""
    import threading

    cfg = _cfg(tiny_models, "qwen2_5_vl")
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    caches = RunCaches.for_run(cfg, processor)
    cache = caches.vision_for(model)
    started: list[threading.Event] = []
    threads: set[str] = set()
    real_inputs, real_features = vision_prepass.image_inputs, cache.features

    def inputs(processor, images, memo=None):
        threads.add(threading.current_thread().name)
        started.append(threading.Event())
        started[-1].set()
        return real_inputs(processor, images, memo=memo)

    overlapped = []

    def features(model, keys, *args):
        calls = len(overlapped)
        if calls + 1 < 3:  # 3 batches: the first two tower calls have a next batch to overlap with
            overlapped.append(_wait_for(started, calls + 1))
        else:
            overlapped.append(True)
        return real_features(model, keys, *args)

    monkeypatch.setattr(vision_prepass, "image_inputs", inputs)
    monkeypatch.setattr(cache, "features", features)
    images = vision_prepass.fold_images(cfg, _samples(table, cfg), [], [])
    counts = vision_prepass.encode_images(model, processor, images, cache, max_images=3, progress=False)
    assert counts["calls"] == 3 and counts["images"] == 8
    assert overlapped == [True, True, True]
    assert threads and threading.current_thread().name not in threads


def _wait_for(started: list, index: int, timeout: float = 5.0) -> bool:
    """Whether the `index`-th image processor call has started within `timeout` seconds."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(started) > index:
            return True
        time.sleep(0.01)
    return False


def test_no_prepass_where_the_cache_does_not_serve(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    cfg.lora.vision = True  # the tower trains: its features change every step
    processor = load_processor(cfg)

    samples = _samples(table, cfg)

    def prepass() -> dict:  # recipe.Experiment's fields the pre-pass reads, then the fold's model
        exp = SimpleNamespace(cfg=cfg, processor=processor, caches=RunCaches.for_run(cfg, processor))
        exp.test_samples = []
        return vision_prepass.prepass_fold(exp, load_model(cfg, training=True), samples, [])

    assert prepass() == {}
    cfg.lora.vision, cfg.speed.vision_prepass = False, False
    assert prepass() == {}
    cfg.speed.vision_prepass = True
    assert prepass()["images"] == 8


# -- a 2-fold run with and without the pre-pass ------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlmexp.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=24, n_test=12)


@pytest.mark.slow
def test_a_run_with_the_prepass_equals_one_without(demo, tmp_path, monkeypatch):
    from vlmexp import recipe

    made, passes = [], []
    for_run, encode = RunCaches.for_run.__func__, vision_prepass.encode_images

    def record_caches(cls, cfg, processor):
        made.append(for_run(cls, cfg, processor))
        return made[-1]

    def record_pass(*args, **kwargs):
        passes.append(encode(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(recipe.RunCaches, "for_run", classmethod(record_caches))
    monkeypatch.setattr(vision_prepass, "encode_images", record_pass)

    def run(on: bool):
        cfg = load_config(
            [
                "model.name=tiny:qwen2_5_vl",
                "folds=2",
                "train.epochs=1",
                "train.eval=true",
                "train.batch_size=8",
                "predict.batch_size=8",
                f"speed.vision_prepass={str(on).lower()}",
                f"name=prepass-{on}",
                f"data.dir={demo}",
                f"runs_dir={tmp_path / 'runs'}",
                f"model.cache_dir={tmp_path / 'tiny'}",
                f"leaderboard={tmp_path / 'leaderboard.csv'}",
            ]
        )
        root = recipe.run_experiment(cfg).root
        return read_table(root / "oof.csv"), read_table(root / "test_probs.csv")

    oof_off, test_off = run(False)
    assert passes == []
    oof_on, test_on = run(True)
    cache = made[-1].vision
    # fold 0 put every training and test image through the tower; fold 1 and every prediction (2 folds x
    # validation, per-epoch eval and test) found them all cached
    assert [p["images"] for p in passes] == [len(cache)] + [0] * (len(passes) - 1) and len(passes) > 2
    assert len(cache) == 24 + 12
    assert cache.misses == len(cache)  # each image computed once in the whole run
    assert passes[0]["sizes"] > 1 and passes[0]["calls"] >= passes[0]["sizes"]
    cols = [c for c in oof_on.columns if c.startswith("p:")]
    for on, off in ((oof_on, oof_off), (test_on, test_off)):
        assert on["id"].tolist() == off["id"].tolist()
        np.testing.assert_allclose(on[cols].to_numpy(float), off[cols].to_numpy(float), atol=1e-5)


def test_pixels_built_by_several_workers_give_the_same_features(tiny_models, table, monkeypatch):
    """With 2 pixel workers each batch's images are split between two image processor calls (one per
    worker thread), whose parts are joined by grid into the same tower calls: same features, and each
    image still computed once."""
    import threading

    cfg = _cfg(tiny_models, "qwen2_5_vl")
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    images = vision_prepass.fold_images(cfg, _samples(table, cfg), [], [])
    real_inputs = vision_prepass.image_inputs
    calls: list[tuple[str, int]] = []

    def inputs(processor, images, memo=None):
        calls.append((threading.current_thread().name, len(images)))
        return real_inputs(processor, images, memo=memo)

    monkeypatch.setattr(vision_prepass, "image_inputs", inputs)

    def features(workers: int):
        caches = RunCaches.for_run(cfg, processor)
        cache = caches.vision_for(model)
        calls.clear()
        counts = vision_prepass.encode_images(
            model,
            processor,
            images,
            cache,
            max_images=3,
            progress=False,
            encoder=caches.encoder,
            workers=workers,
        )
        assert caches.encoder.memo.computed == 8  # every distinct image through the processor once
        return counts, {k: cache._store[k] for k in cache.keys()}, list(calls)

    one_counts, one, one_calls = features(1)
    two_counts, two, two_calls = features(2)
    assert one_counts == two_counts and one_counts["calls"] == 3  # tower calls: one per batch of one grid
    assert [n for _, n in one_calls] == [3, 3, 2]
    assert [n for _, n in two_calls] == [2, 1, 2, 1, 1, 1]  # each batch split in two
    # on the pool's threads; not necessarily on both: a worker that finished its part before the next
    # was handed out takes that one too (the pool reuses an idle thread), as a loaded CI machine showed
    assert all(name.startswith("vlmexp-pixels") for name, _ in two_calls)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)
