"""Vision-tower levers (engine/vision_speed.py): same features as the plain tower, on the CPU in fp32."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmexp.config import Config
from vlmexp.engine import vision_speed


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture()
def qwen25(tiny_models):
    path = tiny_models("qwen2_5_vl")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(path)


def _features(model, processor, images) -> torch.Tensor:
    enc = processor.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
    return torch.cat(out.pooler_output)


def test_padded_vision_mlp_gives_the_same_features(qwen25):
    model, processor = qwen25
    images = _images([(112, 112), (84, 140)])
    before = _features(model, processor, images)
    inter = model.config.vision_config.intermediate_size
    assert inter % vision_speed.PAD_MULTIPLE, "the tiny tower must have an odd size for this test to bite"
    n = vision_speed.pad_vision_mlp(model)
    blocks = model.model.visual.blocks
    assert n == len(blocks)
    assert blocks[0].mlp.down_proj.in_features == -(-inter // 128) * 128
    assert blocks[0].mlp.gate_proj.weight.shape[0] == blocks[0].mlp.down_proj.in_features
    after = _features(model, processor, images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert vision_speed.pad_vision_mlp(model) == 0  # idempotent: already a multiple of 128


def test_padding_is_skipped_when_the_vision_tower_carries_lora(qwen25):
    from vlmexp.models.lora import apply_lora

    model, _ = qwen25
    cfg = Config()
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, vision=True))
    peft_model = apply_lora(model, cfg)
    plain, why = vision_speed.tower_is_plain(peft_model)
    assert not plain and "adapters" in why
    assert vision_speed.pad_vision_mlp(peft_model) == 0
    mlp = vision_speed.vision_tower(peft_model).blocks[0].mlp
    assert mlp.down_proj.in_features == model.config.vision_config.intermediate_size


def test_image_count_buckets_keep_each_images_features(qwen25):
    model, processor = qwen25
    same = _images([(112, 112)] * 3)  # 3 images -> a call of 4 (the last one copied), 3 returned
    mixed = _images([(112, 112), (84, 140), (140, 84)])
    before_same, before_mixed = _features(model, processor, same), _features(model, processor, mixed)
    state: dict = {}
    assert vision_speed.bucket_images(model, state)
    assert not vision_speed.bucket_images(model, state)  # wrapped once
    calls = []
    visual = model.model.visual
    hook = visual.blocks[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    torch.testing.assert_close(_features(model, processor, same), before_same, atol=1e-5, rtol=0)
    assert state["static"] and calls[-1] == 4 * 64  # 4 images of 8x8 patches
    torch.testing.assert_close(_features(model, processor, mixed), before_mixed, atol=1e-5, rtol=0)
    assert not state["static"]  # mixed sizes: as they are, eager blocks
    hook.remove()
    assert [vision_speed.image_bucket(n) for n in (1, 3, 8, 9, 300)] == [1, 4, 8, 16, 300]


@pytest.mark.gpu
def test_padded_and_compiled_tower_gives_the_same_features_on_cuda(tiny_models, monkeypatch):
    # cuDNN's fp32 convolutions run in TF32 by default, the patch matmul in full fp32: compare like with like
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    path = tiny_models("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).cuda().eval()
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(path)
    same = _images([(112, 112)] * 3)

    def feats():
        enc = processor.image_processor(images=same, return_tensors="pt")
        with torch.no_grad():
            out = model.model.get_image_features(
                enc["pixel_values"].cuda(), enc["image_grid_thw"].cuda(), return_dict=True
            )
        return torch.cat(out.pooler_output)

    before = feats()
    cfg = Config()
    done = vision_speed.prepare_tower(model, cfg)
    assert done == {"vision_pad": len(model.model.visual.blocks), "vision_patch_gemm": 1}
    cfg = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, vision_compile=True))
    assert vision_speed.prepare_tower(model, cfg)["vision_compile"] == len(model.model.visual.blocks)
    torch.testing.assert_close(feats(), before, atol=1e-4, rtol=0)  # compiled: fp32 within 1e-4


def test_quantised_or_vision_training_runs_leave_the_tower_alone(qwen25):
    model, _ = qwen25

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes' quantised Linear (a subclass)
        pass

    mlp = model.model.visual.blocks[0].mlp
    q = Linear4bit(mlp.gate_proj.in_features, mlp.gate_proj.out_features)
    mlp.gate_proj = q
    inter = model.config.vision_config.intermediate_size
    cfg = Config()
    vision_run = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, vision=True))
    assert vision_speed.prepare_tower(model, vision_run) == {}  # the run trains the tower: nothing
    done = vision_speed.prepare_tower(model, cfg)
    assert done == {"vision_pad": len(model.model.visual.blocks) - 1, "vision_patch_gemm": 1}
    assert mlp.down_proj.in_features == inter and q.out_features == inter  # the quantised MLP untouched


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_patch_embedding_as_one_matmul_gives_the_same_features(tiny_models, family):
    """Qwen3-VL's patch conv has a bias, Qwen2/2.5-VL's none: both the same as the convolution."""
    path = tiny_models(family)
    model = (
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    )
    processor = AutoProcessor.from_pretrained(path)
    images = _images([(112, 112), (84, 140)])
    conv = model.model.visual.patch_embed.proj
    before = _features(model, processor, images)
    calls = []
    plain = torch.nn.functional.conv3d
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(1) or plain(*a, **k))
        assert vision_speed.patch_embed_gemm(model) == 1
        after = _features(model, processor, images)
    assert calls == []  # the convolution did not run
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert vision_speed.patch_embed_gemm(model) == 0  # once only
    other = torch.randn(2, conv.in_channels, *[2 * k for k in conv.kernel_size])  # not one window a patch
    torch.testing.assert_close(conv(other), torch.nn.Conv3d.forward(conv, other))


def test_compiled_blocks_do_not_recompile_for_each_call(tiny_models, monkeypatch):
    """The batched window attention looks its window lengths up by the cu_seqlens tensor's identity;
    traced inside a compiled block that lookup was a guard on the tensor's id, new every call, so every
    call compiled the blocks again (run AP: 28 images/s against 187 eager). Dynamo's eager backend
    stands in for inductor: the guards, and so the recompiles, are the same."""
    import torch._dynamo as dynamo

    plain_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: plain_compile(fn, backend="eager", **kw))
    path = tiny_models("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(path)
    vision_speed.patch_vision_attention(model)
    dynamo.reset()
    assert vision_speed.compile_vision_blocks(model) == len(model.model.visual.blocks)
    images = _images([(112, 112)] * 4)
    _features(model, processor, images)
    dynamo.utils.counters.clear()
    for _ in range(2):
        _features(model, processor, images)
    assert dynamo.utils.counters["stats"].get("unique_graphs", 0) == 0
    dynamo.reset()
