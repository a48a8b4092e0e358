"""engine/encode.py: rows encoded once equal the processor's and trl's batches; the run caches
change speed, not results (training losses, predictions); the vision cache refuses a training tower."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import set_seed
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlmexp.config import Config
from vlmexp.engine import vision_cache
from vlmexp.engine.batching import rope_index_fn
from vlmexp.engine.encode import Encoder, image_key
from vlmexp.engine.predict import _encode, predict
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.engine.train import train_fold, training_dataset
from vlmexp.engine.trainer import build_trainer
from vlmexp.models import tiny
from vlmexp.models.load import load_model, load_processor
from vlmexp.models.parts import unwrap
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns

FAMILIES = tiny.FAMILIES
LABELS = ["red", "green", "label_a", "label_b"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """Eight rows of different image sizes (so Qwen grids and prompt lengths differ in a batch)."""
    d = tmp_path_factory.mktemp("enc")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        arr = rng.integers(0, 255, (40 + 8 * (i % 3), 48 + 8 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append({"id": str(i), "image": str(d / f"{i}.png"), "label": LABELS[i % 4], "note": "x" * i})
    return pd.DataFrame(rows)


def _cfg(tiny_models, family: str) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    cfg.lora.r, cfg.lora.dropout = 8, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.logging_steps = 2.0, 4, 1
    cfg.train.warmup_ratio, cfg.train.eval, cfg.train.lr = 0.0, False, 5e-3
    return cfg


def _samples(df, cfg, with_answer=True, prompt="baseline"):
    samples = build_samples(
        df, labels=LABELS, descriptions={}, template=load_template(prompt), cfg=cfg, with_answer=with_answer
    )
    for s, note in zip(samples, df["note"], strict=True):  # row-dependent prompt lengths
        user = [m for m in s["messages"] if m["role"] == "user"][-1]
        user["content"][-1]["text"] += note
    return samples


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_trls_batch_and_the_processors_prompts(family, tiny_models, table):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    model = load_model(cfg, training=False)
    examples = training_dataset(cfg, processor, _samples(table[:5], cfg))
    enc = Encoder(processor, cfg.train.max_length)
    enc.bind(model)
    want = DataCollatorForVisionLanguageModeling(processor, max_length=2048, completion_only_loss=True)(
        [dict(e) for e in examples]
    )
    got = enc.pad_train([enc.train_row(e) for e in examples])
    assert set(want) <= set(got)
    for key, value in want.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key

    prompts = [split_turn(processor, s["messages"]).prompt for s in _samples(table[:5], cfg, False)]
    images = [e["images"] for e in examples]
    extra = [[5, 6]] * 5  # e.g. the tokens all candidate labels share
    want = _encode(processor, prompts, images, extra=extra)
    got = enc.pad_prompts([enc.prompt_row(p, im, x) for p, im, x in zip(prompts, images, extra, strict=True)])
    for key, value in want.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key

    if "image_grid_thw" in want:  # M-RoPE positions built per row on the CPU = the model's own
        positions, _ = rope_index_fn(model)(
            input_ids=want["input_ids"],
            mm_token_type_ids=want["mm_token_type_ids"],
            image_grid_thw=want["image_grid_thw"],
            attention_mask=want["attention_mask"],
        )
        assert torch.equal(got["position_ids"], positions)
    hits = enc.hits
    enc.pad_train([enc.train_row(e) for e in examples])
    assert enc.hits == hits + 5  # the second epoch or fold encodes nothing


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_rows_of_a_batch_in_one_call_equal_rows_one_by_one(family, tiny_models, table):
    """`Encoder.prompt_rows` (prediction's batches) encodes a grid model's new rows in one processor call,
    each row what `prompt_row` keeps for it alone; other families go row by row. A repeated row is a hit."""
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    model = load_model(cfg, training=False)
    samples = _samples(table[:5], cfg, False)
    prompts = [split_turn(processor, s["messages"]).prompt for s in samples] + [None]
    prompts[-1] = prompts[0]
    images = [s["images"] for s in samples] + [samples[0]["images"]]
    extra = [[5, 6]] * 6
    one, batched = Encoder(processor, 2048, memo=True), Encoder(processor, 2048, memo=True)
    one.bind(model)
    batched.bind(model)
    want = [one.prompt_row(p, im, x) for p, im, x in zip(prompts, images, extra, strict=True)]
    calls, real = [], batched._row_processor
    batched._row_processor = lambda *a, **k: calls.append(1) or real(*a, **k)
    got = batched.prompt_rows(prompts, images, extra)
    grid = "image_grid_thw" in want[0]
    assert len(calls) == (2 if grid else 5)  # grid: the first row alone (the memo learns the family), then 4
    assert (batched.misses, batched.hits) == (5, 1) == (one.misses, one.hits)
    assert got[5] is got[0]
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys()
        for key, value in w.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(g[key], value), key
            elif key != "media":
                assert g[key] == value, key
    assert one.pixels.keys() == batched.pixels.keys()
    for key, value in one.pixels.items():
        assert torch.equal(batched.pixels[key], value)


def test_rows_whose_media_do_not_stack_fall_back_to_trls_collator(tiny_models, table, tmp_path):
    cfg = _cfg(tiny_models, "smolvlm")
    processor = load_processor(cfg)
    pair = table[1:2].assign(image=table["image"][1] + "|" + table["image"][2])
    examples = training_dataset(cfg, processor, _samples(table[:1], cfg) + _samples(pair, cfg))
    trainer = build_trainer(cfg, load_model(cfg, training=True), processor, examples, tmp_path)
    got = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    want = DataCollatorForVisionLanguageModeling(processor, max_length=2048, completion_only_loss=True)(
        [dict(e) for e in examples]
    )
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_image_keys_follow_content_not_identity():
    a = Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8))
    b = Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8))
    c = Image.fromarray(np.full((8, 8, 3), 8, dtype=np.uint8))
    assert image_key(a) == image_key(b) != image_key(c)


def _losses(cfg, processor, samples, tmp_path):
    set_seed(0)
    model = load_model(cfg, training=True)
    caches = RunCaches.for_run(cfg, processor)
    result = train_fold(cfg, model, processor, samples, [], LABELS, tmp_path, caches=caches)
    return [e["loss"] for e in result.log_history if "loss" in e], model, caches


# Qwen3-VL's tower also feeds deepstack features into decoder layers; Qwen3.5 has recurrent layers
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_run_caches_change_speed_not_training(family, tiny_models, table, tmp_path):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    fast_losses, model, caches = _losses(cfg, processor, samples, tmp_path / "fast")
    assert caches.vision is not None and len(caches.vision) == 8  # one feature tensor per image
    assert caches.vision.hits >= 8 and caches.encoder.hits >= 8  # epoch 2 reused epoch 1's work
    assert not caches.encoder.pixels  # every image's features are cached: its pixels were let go
    key = next(iter(caches.vision.keys()))
    row = next(r for r in caches.encoder._rows.values() if key in r["image_keys"])
    sample = next(s for s in samples if caches.encoder._key(s["images"][0]) == key)
    pixels = processor.image_processor(images=sample["images"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tower = unwrap(model).model.get_image_features(pixels, row["image_grid_thw"][:1], return_dict=True)
    # every feature the language model takes from the tower: merged tokens, then deepstack levels
    want = (tower.pooler_output[0], *(level[0] for level in getattr(tower, "deepstack_features", None) or []))
    assert len(caches.vision._store[key]) == len(want) == (2 if family == "qwen3_vl" else 1)
    for got_feat, want_feat in zip(caches.vision._store[key], want, strict=True):
        torch.testing.assert_close(got_feat, want_feat, rtol=1e-5, atol=1e-6)
    cfg.speed.encode_once, cfg.speed.vision_cache = False, "off"
    plain_losses, _, plain = _losses(cfg, processor, samples, tmp_path / "plain")
    assert plain.encoder is None and plain.vision is None
    assert len(fast_losses) == len(plain_losses) == 4
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-4)
    assert fast_losses[-1] < fast_losses[0]

    # Prediction on the trained model: the caches (warm from training) give the plain path's numbers.
    test = _samples(table, cfg, with_answer=False)
    cfg.predict.batch_size = 3
    want = predict(cfg, model, processor, test, LABELS, progress=False)
    got = predict(cfg, model, processor, test, LABELS, progress=False, caches=caches)
    again = predict(cfg, model, processor, test, LABELS, progress=False, caches=caches)  # fold 2's view
    cols = prob_columns(LABELS)
    np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)
    np.testing.assert_allclose(again[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)
    assert got["pred"].tolist() == want["pred"].tolist()


def test_vision_cache_is_skipped_or_refused_when_the_tower_trains(tiny_models, table):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    cfg.lora.vision = True
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    assert not vision_cache.vision_frozen(model)
    caches = RunCaches.for_run(cfg, processor)  # auto: quietly off for a training tower
    assert caches.vision_for(model) is None and caches.vision_for(model, training=False) is None
    cfg.speed.vision_cache = "on"
    with pytest.raises(ValueError, match="speed.vision_cache=on.*vision tower trains"):
        RunCaches.for_run(cfg, processor).vision_for(model)
    cfg.lora.vision = False  # a tower the cache may serve
    frozen = load_model(cfg, training=True)
    assert RunCaches.for_run(cfg, processor).vision_for(frozen) is not None


def test_prediction_without_training_knowledge_does_not_use_the_vision_cache(tiny_models):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    caches = RunCaches.for_run(cfg, load_processor(cfg))
    # Before a training model told it whether the tower trains, prediction must not trust cached
    # features (an inference model's requires_grad says nothing about what training changed).
    assert caches.vision_for(load_model(cfg, training=False), training=False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [True, False])
def test_compiled_decoder_layers_give_the_same_loss_on_cuda(tiny_models, table, tmp_path, dynamic):
    cfg = _cfg(tiny_models, "qwen2_5_vl")
    cfg.speed.compile_dynamic = dynamic
    cfg.model.dtype, cfg.train.bf16, cfg.train.tf32 = "float32", "off", False  # fp32 throughout: exact
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    eager, _, _ = _losses(cfg, processor, samples, tmp_path / "eager")
    cfg.speed.compile = True
    compiled, model, _ = _losses(cfg, processor, samples, tmp_path / "compiled")
    assert any(getattr(m, "_vlmexp_compiled", False) for m in model.modules())
    np.testing.assert_allclose(compiled, eager, rtol=1e-3)
