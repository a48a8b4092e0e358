"""engine/vision_inputs.py: the tower's grid-derived inputs computed on the host give the features the
tower computes itself, and the tower then derives nothing from the grid (on a GPU each derivation
waited for it); the feature cache and the image-count buckets hand them on."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmexp.engine import vision_inputs, vision_speed
from vlmexp.engine.vision_cache import VisionFeatureCache
from vlmexp.engine.vision_inputs import tower_inputs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
# The helper each precomputed key stands in for (transformers 5.24 vision_utils).
HELPER_KEY = {
    "get_vision_position_ids": "position_ids",
    "get_vision_attention_seqlens": "cu_seqlens",
    "get_vision_window_index": "window_index",
    "get_vision_interpolation_indices_and_weights": "interp_indices",
}


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _model(tiny_models, family: str):
    path = tiny_models(family)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(path)


def _spy_helpers(monkeypatch, model) -> list[tuple[str, bool]]:
    """Wrap the helpers the tower's module calls; each call records (helper, whether its value came
    precomputed in kwargs rather than computed from the grid)."""
    module = importlib.import_module(type(model.model.visual).__module__)
    seen: list[tuple[str, bool]] = []
    for name, key in HELPER_KEY.items():
        real = getattr(module, name, None)
        if real is None:
            continue

        def spy(*args, _real=real, _name=name, _key=key, **kwargs):
            seen.append((_name, _key in (kwargs.get("kwargs") or {})))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_inputs_give_the_same_features_and_the_tower_derives_nothing(
    tiny_models, monkeypatch, family
):
    model, processor = _model(tiny_models, family)
    # Two sizes, one image twice: several windows per image on Qwen2.5-VL, uneven grids elsewhere.
    enc = processor.image_processor(images=_images([(112, 112), (84, 140), (112, 112)]), return_tensors="pt")
    pix, grid = enc["pixel_values"], enc["image_grid_thw"]
    core = model.model
    with torch.no_grad():
        plain = core.get_image_features(pix, grid, return_dict=True)
        pre = tower_inputs(core.visual, grid, "cpu")
        seen = _spy_helpers(monkeypatch, model)
        fast = core.get_image_features(pix, grid, return_dict=True, **pre)
    assert seen and all(precomputed for _, precomputed in seen), seen
    assert {"position_ids", "cu_seqlens"} <= pre.keys()
    assert ("window_index" in pre) == (family == "qwen2_5_vl")
    assert ("interp_indices" in pre) == family.startswith("qwen3")
    for a, b in zip(plain.pooler_output, fast.pooler_output, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.last_hidden_state, fast.last_hidden_state)
    deep_plain = getattr(plain, "deepstack_features", None) or []
    deep_fast = getattr(fast, "deepstack_features", None) or []
    assert len(deep_plain) == len(deep_fast)
    for level_a, level_b in zip(deep_plain, deep_fast, strict=True):
        for a, b in zip(level_a, level_b, strict=True):
            assert torch.equal(a, b)


def test_the_batched_window_attention_reads_no_lengths_back(tiny_models, monkeypatch):
    """The window lengths come from `tower_inputs` (known on the host): a tower forward then calls
    `.tolist()` once, for get_image_features' split sizes of the CPU grid; computed by the tower from
    the grid, position ids, windows and the lengths' read-backs made it 8 here."""
    model, processor = _model(tiny_models, "qwen2_5_vl")
    assert vision_speed.patch_vision_attention(model) > 0
    enc = processor.image_processor(images=_images([(112, 112), (112, 112)]), return_tensors="pt")
    pix, grid = enc["pixel_values"], enc["image_grid_thw"]
    real = torch.Tensor.tolist

    def reads(**kwargs) -> int:
        calls = []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or real(t))
        with torch.no_grad():
            model.model.get_image_features(pix, grid, **kwargs)
        monkeypatch.setattr(torch.Tensor, "tolist", real)
        return len(calls)

    computed = reads()
    assert reads(**tower_inputs(model.model.visual, grid, "cpu")) == 1 < computed


def test_the_feature_cache_hands_them_to_the_tower(tiny_models, monkeypatch):
    model, processor = _model(tiny_models, "qwen2_5_vl")
    enc = processor.image_processor(images=_images([(112, 112), (84, 140)]), return_tensors="pt")
    pix, grid = enc["pixel_values"], enc["image_grid_thw"]
    with torch.no_grad():
        plain = model.model.get_image_features(pix, grid, return_dict=True).pooler_output
    seen = _spy_helpers(monkeypatch, model)
    mm = VisionFeatureCache().features(model, ["a", "b"], grid, pix, [0, 1])
    assert seen and all(precomputed for _, precomputed in seen), seen
    for a, b in zip(plain, mm["image"].pooler_output, strict=True):
        assert torch.equal(a, b)


def test_image_count_buckets_recompute_them_for_the_padded_count(tiny_models):
    """3 images of one size run as 4 (speed.vision_compile's buckets): inputs precomputed for 3 would
    not fit the 4 images' patches."""
    model, processor = _model(tiny_models, "qwen2_5_vl")
    enc = processor.image_processor(images=_images([(112, 112)] * 3), return_tensors="pt")
    pix, grid = enc["pixel_values"], enc["image_grid_thw"]
    with torch.no_grad():
        plain = model.model.get_image_features(pix, grid, return_dict=True).pooler_output
    state: dict = {}
    assert vision_speed.bucket_images(model, state)
    mm = VisionFeatureCache().features(model, ["a", "b", "c"], grid, pix, [0, 1, 2])
    assert state["static"]
    for a, b in zip(plain, mm["image"].pooler_output, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_a_grid_off_the_cpu_is_refused_and_an_unknown_tower_gets_nothing(tiny_models):
    class Tower(torch.nn.Module):
        def forward(self, hidden_states, grid_thw):
            return hidden_states

    assert tower_inputs(Tower(), torch.tensor([[1, 4, 4]]), "cpu") == {}
    model, _ = _model(tiny_models, "qwen2_vl")
    meta = torch.empty((1, 3), dtype=torch.long, device="meta")  # stands in for a GPU grid
    with pytest.raises(ValueError, match="on the CPU"):
        vision_inputs.tower_inputs(model.model.visual, meta, "cpu")


@pytest.mark.gpu
def test_a_tower_call_through_the_cache_waits_for_no_grid_derivation_on_cuda(tiny_models):
    """On a GPU: the pre-pass's tower call (pixels on the GPU, grid on the CPU) syncs the host nowhere
    in transformers' grid helpers, the tower's window permutation, `get_image_features` or our code; run
    AL's profile counted about 20 such syncs a call before."""
    from vlmexp.bench.profile import SyncSites

    model, processor = _model(tiny_models, "qwen2_5_vl")
    model = model.cuda()
    assert vision_speed.patch_vision_attention(model) > 0
    enc = processor.image_processor(images=_images([(112, 112)] * 4), return_tensors="pt")
    pix, grid = enc["pixel_values"].cuda(), enc["image_grid_thw"]
    with torch.no_grad():
        want = model.model.get_image_features(pix, grid.cuda(), return_dict=True).pooler_output
    VisionFeatureCache().features(model, list("abcd"), grid, pix, range(4))  # warm-up: cuBLAS, allocator
    torch.cuda.synchronize()
    with SyncSites() as syncs:
        mm = VisionFeatureCache().features(model, list("efgh"), grid, pix, range(4))
    torch.cuda.synchronize()
    watched = ("vision_utils", "permute_input_for_window_attn", "get_image_features", "vlmexp/")
    assert not [s for s in syncs.sites if any(w in s for w in watched)], syncs.report(1)
    for a, b in zip(want, mm["image"].pooler_output, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
