"""The speed levers give the plain path's loss, gradients and image features (tiny model): the bench's
answer-only loss (bench/answer_only_loss.py), the batched vision window attention (engine/vision_speed.py),
the vision feature cache (engine/vision_cache.py), the checkpointing decision (engine/memory.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vlmexp.bench.answer_only_loss import answer_only_loss
from vlmexp.bench.shapes import build_model, build_processor, get_shape
from vlmexp.bench.synth import collate_train, make_samples
from vlmexp.engine import memory, vision_cache, vision_speed


@pytest.fixture(scope="module")
def tiny():
    shape = get_shape("tiny")
    processor = build_processor(shape, 224)
    model = build_model(shape, seed=1)
    samples = make_samples(processor, 3, 224, 120, n_labels=5, seed=3)
    return model, processor, samples


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_answer_only_loss_equals_plain_loss_and_gradients(tiny):
    model, processor, samples = tiny
    batch = collate_train(processor, samples)
    assert (batch["labels"] != -100).sum() > 0
    model.zero_grad()
    plain = model(**batch).loss
    plain.backward()
    g_plain = _grads(model)
    model.zero_grad()
    quick = answer_only_loss(model, batch)
    quick.backward()
    g_fast = _grads(model)
    model.zero_grad()
    torch.testing.assert_close(quick, plain, rtol=1e-5, atol=1e-6)
    assert g_plain.keys() == g_fast.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_fast[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_answer_only_loss_respects_num_items_in_batch(tiny):
    model, processor, samples = tiny
    batch = collate_train(processor, samples)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = answer_only_loss(model, batch)
        summed = answer_only_loss(model, batch, num_items_in_batch=2 * n)
    torch.testing.assert_close(summed, mean / 2)


def test_batched_vision_attention_equals_the_window_loop():
    shape = get_shape("tiny")
    processor = build_processor(shape, 224)
    model = build_model(shape, seed=2)
    rng = np.random.default_rng(0)
    # three sizes: 4 windows, uneven windows at the border, a single window
    sizes = [(224, 224), (168, 280), (112, 112)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pix = processor.image_processor(images, return_tensors="pt")
    with torch.no_grad():
        before = model.model.get_image_features(pix["pixel_values"], pix["image_grid_thw"]).pooler_output
        assert vision_speed.patch_vision_attention(model) == shape.vision["depth"]
        after = model.model.get_image_features(pix["pixel_values"], pix["image_grid_thw"]).pooler_output
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_window_lengths_are_read_from_the_device_once_a_tower_forward(monkeypatch):
    """Each `.tolist()` of the window boundaries waits for the GPU; one per block (32 on the 3B) kept
    the CPU from preparing the next pre-pass batch while the tower ran. Read once per boundary tensor
    (windows, full attention) and forward: a deeper tower reads no more than a shallow one."""
    image = Image.fromarray(np.full((224, 168, 3), 90, dtype=np.uint8))
    real = torch.Tensor.tolist

    def reads(depth: int, full: list[int]) -> int:
        tiny = get_shape("tiny")
        shape = dataclasses.replace(
            tiny, vision={**tiny.vision, "depth": depth, "fullatt_block_indexes": full}
        )
        processor, model = build_processor(shape, 224), build_model(shape, seed=2)
        assert vision_speed.patch_vision_attention(model) == depth
        pix = processor.image_processor([image], return_tensors="pt")
        seen = []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: seen.append(1) or real(t))
        with torch.no_grad():
            model.model.get_image_features(pix["pixel_values"], pix["image_grid_thw"])
        monkeypatch.setattr(torch.Tensor, "tolist", real)
        return len(seen)

    assert reads(8, [3, 7]) == reads(2, [1])


def test_vision_feature_cache_gives_the_same_loss_and_hits(tiny):
    model, processor, samples = tiny
    batch = collate_train(processor, samples)
    keys = [s["id"] for s in samples]
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    try:
        cache = vision_cache.VisionFeatureCache()
        mm = cache.encoder_outputs(model, batch["pixel_values"], batch["image_grid_thw"], keys)
        mm2 = cache.encoder_outputs(model, batch["pixel_values"], batch["image_grid_thw"], keys)
        assert (cache.misses, cache.hits, len(cache)) == (3, 3, 3)
        with torch.no_grad():
            plain = model(**batch).loss
            cached = answer_only_loss(model, batch, mm_encoder_outputs=mm2)
        torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)
        assert mm["image"].pooler_output[0] is mm2["image"].pooler_output[0]
    finally:
        for p in model.model.visual.parameters():
            p.requires_grad_(True)


def test_vision_feature_cache_refuses_a_trained_vision_tower(tiny):
    model, processor, samples = tiny
    batch = collate_train(processor, samples[:1])
    with pytest.raises(ValueError, match="frozen vision tower"):
        vision_cache.VisionFeatureCache().encoder_outputs(
            model, batch["pixel_values"], batch["image_grid_thw"], ["a"]
        )


def test_gradient_checkpointing_decision(tiny):
    model, _, _ = tiny
    assert memory.gradient_checkpointing_needed("on", model, 8, 570, 1024) == (
        True,
        "train.gradient_checkpointing=on",
    )
    assert memory.gradient_checkpointing_needed("off", model, 8, 570, 1024)[0] is False
    need = memory.activation_bytes(model, 8, 570, 1024)
    assert need > 0
    assert memory.gradient_checkpointing_needed("auto", model, 8, 570, 1024, free_bytes=need)[0] is True
    assert memory.gradient_checkpointing_needed("auto", model, 8, 570, 1024, free_bytes=2 * need)[0] is False
    # twice the batch, twice the activations (the trained weights' 12 bytes each come once)
    weights = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.activation_bytes(model, 16, 570, 1024) - weights == 2 * (need - weights)


def test_activation_estimate_counts_what_trains(tiny):
    model, _, _ = tiny
    full = memory.activation_bytes(model, 8, 570, 1024)
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    try:
        for p in vision:
            p.requires_grad_(False)
        frozen_vision = memory.activation_bytes(model, 8, 570, 1024)
        for p in model.parameters():
            p.requires_grad_(False)
        nothing = memory.activation_bytes(model, 8, 570, 1024)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    # a frozen vision tower keeps no activations; frozen weights need no gradients or moments
    vision_weights = 12 * sum(p.numel() for p in vision)
    assert full - frozen_vision > vision_weights
    assert frozen_vision - nothing == 12 * sum(
        p.numel() for n, p in model.named_parameters() if ".visual." not in f".{n}"
    )


@pytest.mark.gpu
def test_answer_only_loss_on_gpu_bf16():
    shape = get_shape("tiny")
    processor = build_processor(shape, 224)
    model = build_model(shape, "cuda", torch.bfloat16, seed=1)
    batch = {k: v.cuda() for k, v in collate_train(processor, make_samples(processor, 2, 224, 120)).items()}
    with torch.no_grad():
        torch.testing.assert_close(
            answer_only_loss(model, batch), model(**batch).loss.float(), rtol=2e-2, atol=2e-2
        )
