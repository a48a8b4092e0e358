"""The bench on Gemma 3 shapes (CPU): tiny-gemma3 rows end to end, gemma-3-4b FLOPs from a meta model,
and synthetic prompts that hit their token budget in both families."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmexp.bench import flops
from vlmexp.bench.run import run_bench
from vlmexp.bench.shapes import build_config, build_processor, count_params, get_shape
from vlmexp.bench.synth import candidate_ids, image_tokens, labels, make_samples


def _finite_positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_tiny_gemma3_train_rows_run_reference_and_project():
    result = run_bench("train", "tiny-gemma3", steps=2, warmup=1, modules=("language",))
    ref, proj = result["rows"]
    assert (ref["path"], proj["path"]) == ("reference", "project")
    assert _finite_positive(ref["samples_per_s"]) and _finite_positive(proj["samples_per_s"])
    # no patch grid: the image's token count is recorded instead (112 px, 8x8 patches pooled to 4x4)
    assert result["settings"]["image_grid_thw"] is None and result["settings"]["image_tokens"] == 16
    # trl swapped in its Gemma 3 training template (assistant_only_loss), same init and samples
    assert proj["max_loss_diff_vs_reference"] < 0.5
    # the feature cache serves Gemma 3 (language-only LoRA): the cached pass skips the tower's forward
    assert proj["vision_cache"] is True and proj["flops_per_sample_cached"] < proj["flops_per_sample"]


def test_tiny_gemma3_predict_rows_run_and_warm_rows_skip_the_tower():
    result = run_bench("predict", "tiny-gemma3", n_images=8, predict_batch_sizes=(4,))
    rows = result["rows"]
    assert rows[0]["path"] == "reference-generate"
    assert rows[0]["new_tokens"] == max(
        len(c) for c in candidate_ids(build_processor(get_shape("tiny-gemma3"), 112), labels(25))
    )
    assert all(_finite_positive(r["images_per_s"]) for r in rows)
    assert all(r["same_predictions_as_first_score_row"] for r in rows[1:])
    warm = [r for r in rows if r.get("caches") == "warm"]
    assert len(warm) == 2 and all(r["vision_cache"] for r in warm)
    assert all(r["flops_per_image"] < rows[0]["flops_per_image"] for r in warm)


def test_gemma3_processor_is_fixed_size():
    with pytest.raises(ValueError, match="resolution=112"):
        build_processor(get_shape("tiny-gemma3"), 224)
    processor = build_processor(get_shape("gemma-3-4b"), 896)
    assert image_tokens(processor, 896) == 256


def test_gemma3_4b_flops_count_every_weight_once_per_row():
    config = build_config(
        get_shape("gemma-3-4b")
    )  # outside the meta device: it builds a tiny tokenizer model
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    tokens, patches, soft = 330, (896 // 14) ** 2, 256
    count = flops.count(model.config, tokens)
    core = model.model
    lang = sum(
        2 * m.weight.numel() * tokens for m in core.language_model.modules() if isinstance(m, torch.nn.Linear)
    )
    vision = sum(
        2 * m.weight.numel() * patches
        for m in core.vision_tower.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    )
    vision += 2 * core.multi_modal_projector.mm_input_projection_weight.numel() * soft  # after pooling
    assert count.language_fwd - count.language_attn_fwd == pytest.approx(lang, rel=1e-6)
    assert count.vision_fwd - count.vision_attn_fwd == pytest.approx(vision, rel=1e-6)
    assert count.lm_head_per_token == 2 * model.lm_head.weight.numel()  # tied: the embedding's matrix
    # plausibility: ~2 FLOPs per language weight (the embedding is a lookup) per token
    params = count_params(model)["language"] - core.language_model.embed_tokens.weight.numel()
    assert count.language_fwd == pytest.approx(2 * params * tokens, rel=0.2)


def test_gemma3_sliding_layers_attend_over_the_window_only():
    config = build_config(get_shape("tiny-gemma3"))  # layers: one sliding (window 32), one global
    short, long = flops.count(config, 32), flops.count(config, 320)
    q = config.text_config.num_attention_heads * config.text_config.head_dim
    image_block = 2 * 2 * 2 * q * 16 * 16 / 2  # 16 soft tokens see each other both ways, in both layers
    # within the window both layers see the causal triangle; past it the sliding layer sees 32 keys
    assert short.language_attn_fwd - image_block == pytest.approx(2 * 4 * q * 32 * 32 / 2)
    assert long.language_attn_fwd - image_block == pytest.approx(
        4 * q * (320 * 320 / 2 + 32 * 32 / 2 + 288 * 32)
    )


@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny"])
def test_make_prompt_hits_the_token_budget(shape):
    sh = get_shape(shape)
    res, budget = sh.defaults["resolution"], 150
    processor = build_processor(sh, res)
    sample = make_samples(processor, 1, res, budget)[0]
    text = processor.apply_chat_template(sample["messages"], tokenize=False)
    n = len(processor(text=[text], images=[sample["images"]])["input_ids"][0])
    assert abs(n - budget) <= 2


def test_candidates_end_with_the_templates_end_of_turn():
    for shape, eot in (("tiny-gemma3", "<end_of_turn>"), ("tiny", "<|im_end|>")):
        sh = get_shape(shape)
        processor = build_processor(sh, sh.defaults["resolution"])
        ids = candidate_ids(processor, ["class_03"])[0]
        assert ids[-1] == processor.tokenizer.convert_tokens_to_ids(eot), shape
        assert processor.tokenizer.decode(ids[:-1]) == "class_03"
