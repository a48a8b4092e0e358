"""The vision feature cache on Gemma 3 (engine/vision_cache.py): features computed once per image stand
in for pixel_values with the same logits, prediction and training numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

from vlmexp.config import Config
from vlmexp.engine import vision_cache
from vlmexp.engine.encode import image_key
from vlmexp.engine.predict import predict
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import build_samples
from vlmexp.engine.train import train_fold
from vlmexp.models.load import load_model, load_processor
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 20 * i, 56, 3), dtype=np.uint8)) for i in range(2)]


def _prompts(processor, texts):
    def msgs(t):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]

    return [processor.apply_chat_template(msgs(t), add_generation_prompt=True, tokenize=False) for t in texts]


def test_cached_features_give_the_logits_of_pixel_values(tiny_models, images):
    path = tiny_models("gemma3")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    texts = _prompts(processor, ["hi", "a much longer prompt than the first one"])
    enc = processor(
        text=texts,
        images=[[im] for im in images],
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=False,
    )
    assert (enc["attention_mask"] == 0).any()  # left-padded
    assert enc["pixel_values"].shape[0] == 2 and enc["token_type_ids"].sum() > 0
    real = enc["attention_mask"].bool()
    no_pixels = {k: v for k, v in enc.items() if k != "pixel_values"}
    cache = vision_cache.VisionFeatureCache()
    keys = [image_key(im) for im in images]
    with torch.no_grad():
        want = model(**enc).logits
        mm = cache.pixel_features(model, keys, enc["pixel_values"])
        assert cache.misses == 2 and cache.hits == 0 and len(cache) == 2
        by_cache = model(**no_pixels, mm_encoder_outputs=mm).logits
        again = model(**no_pixels, mm_encoder_outputs=cache.pixel_features(model, keys, enc["pixel_values"]))
        assert cache.misses == 2 and cache.hits == 2  # the second call ran no tower
        feats = mm["image"].pooler_output
        embeds = _embeds_with_features(model, enc["input_ids"], feats)
        by_embeds = model(
            inputs_embeds=embeds, attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"]
        ).logits
        # token_type_ids alone make the bidirectional attention inside an image: without them it differs
        causal = model(inputs_embeds=embeds, attention_mask=enc["attention_mask"], token_type_ids=None).logits
        pan_and_scan = torch.cat([enc["pixel_values"], enc["pixel_values"][:1]])  # 3 crops, 2 images
        assert cache.pixel_features(model, keys, pan_and_scan) is None  # such a batch runs on pixels
    for got in (by_cache, again.logits, by_embeds):
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert (causal[real] - want[real]).abs().max() > 1e-3


LABELS = ["red", "green", "label_a", "label_b"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    """Six rows: images of different sizes (Gemma resizes them all to one crop), prompts of different
    lengths (the batches pad), and the first image again in the last row (a repeat within a run)."""
    d = tmp_path_factory.mktemp("gemma_cache")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(6):
        arr = rng.integers(0, 255, (40 + 8 * (i % 3), 48 + 8 * (i % 2), 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
        image = str(d / ("0.png" if i == 5 else f"{i}.png"))
        rows.append({"id": str(i), "image": image, "label": LABELS[i % 4], "note": "x" * 3 * i})
    return pd.DataFrame(rows)


def _cfg(tiny_models) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models("gemma3"))
    cfg.lora.r, cfg.lora.dropout = 8, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.logging_steps = 2.0, 3, 1
    cfg.train.warmup_ratio, cfg.train.eval, cfg.train.lr = 0.0, False, 5e-3
    cfg.predict.batch_size = 4
    return cfg


def _samples(df, cfg, with_answer=True):
    template = load_template("baseline")
    kw = {"labels": LABELS, "descriptions": {}, "template": template, "cfg": cfg}
    samples = build_samples(df, with_answer=with_answer, **kw)
    for s, note in zip(samples, df["note"], strict=True):  # row-dependent prompt lengths
        user = [m for m in s["messages"] if m["role"] == "user"][-1]
        user["content"][-1]["text"] += note
    return samples


def test_a_training_gemma3_tower_is_not_cached(tiny_models):
    cfg = _cfg(tiny_models)
    cfg.lora.vision = True
    model = load_model(cfg, training=True)
    assert not vision_cache.vision_frozen(model)
    assert RunCaches.for_run(cfg, load_processor(cfg)).vision_for(model) is None


def test_prediction_on_cached_features_equals_prediction_on_pixels(tiny_models, table):
    cfg = _cfg(tiny_models)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)  # language-only LoRA: the tower is frozen
    assert vision_cache.vision_cache_unsupported(model) is None and vision_cache.vision_frozen(model)
    caches = RunCaches.for_run(cfg, processor)
    assert caches.vision_for(model) is caches.vision  # training tells: the tower is frozen
    model.eval()
    test = _samples(table, cfg, with_answer=False)
    cols = prob_columns(LABELS)
    want = predict(cfg, model, processor, test, LABELS, progress=False)
    got = predict(cfg, model, processor, test, LABELS, progress=False, caches=caches)
    assert len(caches.vision) == 5 and caches.vision.misses == 5  # five distinct images, each once
    assert caches.encoder.per_image and not caches.encoder.pixels  # features cached: pixels let go
    misses = caches.vision.misses
    again = predict(cfg, model, processor, test, LABELS, progress=False, caches=caches)  # a later fold
    assert caches.vision.misses == misses and caches.vision.hits >= 6  # no tower call the second time
    np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)
    np.testing.assert_allclose(again[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)
    assert got["pred"].tolist() == want["pred"].tolist()


def _losses(cfg, processor, samples, tmp_path):
    set_seed(0)
    model = load_model(cfg, training=True)
    caches = RunCaches.for_run(cfg, processor)
    result = train_fold(cfg, model, processor, samples, [], LABELS, tmp_path, caches=caches)
    return [e["loss"] for e in result.log_history if "loss" in e], model, caches


def test_training_on_cached_features_gives_the_uncached_losses(tiny_models, table, tmp_path):
    cfg = _cfg(tiny_models)
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    fast, model, caches = _losses(cfg, processor, samples, tmp_path / "fast")
    assert caches.vision is not None and len(caches.vision) == 5
    assert caches.vision.misses == 5 and caches.vision.hits == 7  # epoch 1: one repeat; epoch 2: all six
    assert caches.encoder.per_image and not caches.encoder.pixels  # features cached: pixels let go
    cfg.speed.encode_once, cfg.speed.vision_cache = False, "off"
    plain, _, off = _losses(cfg, processor, samples, tmp_path / "plain")
    assert off.vision is None
    assert len(fast) == len(plain) == 4
    np.testing.assert_allclose(fast, plain, rtol=1e-5)
    assert fast[-1] < fast[0]


def _embeds_with_features(
    model: torch.nn.Module, input_ids: torch.Tensor, feats: torch.Tensor
) -> torch.Tensor:
    """Gemma 3's `inputs_embeds` with precomputed image features: the text embeddings of `input_ids`
    (the image token id replaced by 0 where it is out of the vocabulary, as Gemma3Model.forward does)
    with `feats` (images, mm_tokens_per_image, hidden), in order, at the image token positions. With
    the batch's `token_type_ids` (which alone make the bidirectional image mask) and no pixel_values,
    the model then gives the logits it gives on pixel_values (tests/test_vision_cache_gemma.py)."""
    core = model.model
    image = input_ids == core.config.image_token_id
    ids = input_ids
    if core.config.image_token_id >= core.vocab_size:
        ids = input_ids.masked_fill(image, 0)
    embeds = core.get_input_embeddings()(ids)
    if int(image.sum()) * embeds.shape[-1] != feats.numel():
        raise ValueError(f"{int(image.sum())} image tokens for {feats.shape[0] * feats.shape[1]} features")
    return embeds.masked_scatter(image[..., None], feats.to(embeds.device, embeds.dtype))
