"""`run_bench` on the tiny shape (CPU): rows, FLOP accounting, and reference/project equality."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmexp.bench import flops
from vlmexp.bench.run import run_bench
from vlmexp.bench.shapes import SHAPES, build_config, count_params, get_shape


def test_real_shapes_have_the_hub_parameter_counts():
    # Qwen2.5-VL-3B-Instruct: 3.75 B; Qwen2-VL-7B-Instruct: 8.29 B; Qwen3-VL-8B-Instruct: 8.77 B;
    # gemma-3-4b-it: 4.30 B (their model cards)
    for name, want in (
        ("qwen2.5-vl-3b", 3.75e9),
        ("qwen2-vl-7b", 8.29e9),
        ("qwen3-vl-8b", 8.77e9),
        ("gemma-3-4b", 4.30e9),
    ):
        config = build_config(get_shape(name))  # outside the meta device: it builds a tiny tokenizer model
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert count_params(model)["total"] == pytest.approx(want, rel=0.01), name


def test_flops_match_the_issue_figure_and_scale_with_work():
    cfg = build_config(SHAPES["qwen2.5-vl-3b"])
    count = flops.count(cfg, 570, (1, 32, 32))
    # the issue's "about 8.5 TFLOP per sample" counts logits at every token
    assert count.train(7, vision_trainable=False, logits_positions=570) == pytest.approx(8.5e12, rel=0.02)
    lean = count.train(7, vision_trainable=False)
    assert lean < count.train(7, vision_trainable=False, logits_positions=570)
    assert count.train(7, vision_trainable=True) > lean
    longer = flops.count(cfg, 1140, (1, 32, 32))
    assert 2 * count.language_fwd < longer.language_fwd < 2.2 * count.language_fwd  # attention is quadratic


def test_unknown_kind_and_shape_fail_loud():
    with pytest.raises(ValueError, match="kind"):
        run_bench("fit", "tiny")
    with pytest.raises(ValueError, match="qwen2.5-vl-3b"):
        get_shape("qwen9")


def test_train_bench_reference_and_project_agree(tmp_path):
    out = tmp_path / "train.json"
    result = run_bench("train", "tiny", steps=2, warmup=1, modules=("language",), out=out)
    ref, proj = result["rows"]
    assert (ref["path"], proj["path"]) == ("reference", "project")
    assert (
        ref["gradient_checkpointing"] is True and proj["gradient_checkpointing"] is False
    )  # CPU: auto = off
    assert ref["lora_modules"] == proj["lora_modules"] > 0
    assert len(ref["losses"]) == 3 and len(proj["losses"]) == 6  # the project row passes twice
    assert proj["vision_cache"] is True and proj["samples_per_s_cached"] > 0
    assert proj["flops_per_sample_cached"] < proj["flops_per_sample"]  # the tower is not run then
    # same init, samples and order; the reference also supervises the "\n" after "<|im_end|>", so the
    # curves agree only roughly here (the exact equality is tests/test_engine_train.py's)
    assert proj["max_loss_diff_vs_reference"] < 0.5
    assert proj["gc_reason"].startswith("gradient checkpointing off")
    assert proj["samples_per_s"] > 0 and proj["tokens_per_s"] > proj["samples_per_s"]
    assert result["ratios"]["project/language"] > 0
    assert out.exists()


def test_qwen3_vl_vision_flops_count_every_weight_once_per_row():
    # Qwen3-VL's vision MLP is linear_fc1/fc2 (not gated) and each deepstack level has its own merger:
    # the vision forward's matmul FLOPs are 2 x (weights x rows) over the tower's Linear and conv layers
    model = AutoModelForImageTextToText.from_config(build_config(get_shape("tiny-qwen3-vl")))
    grid = (1, 8, 8)
    patches, merged = 64, 16
    want = 0
    for name, m in model.model.visual.named_modules():
        if isinstance(m, torch.nn.Linear):
            want += 2 * m.weight.numel() * (merged if "merger" in name else patches)
        elif isinstance(m, torch.nn.Conv3d):
            want += 2 * m.weight.numel() * patches
    count = flops.count(model.config, 80, grid)
    assert count.vision_fwd - count.vision_attn_fwd == pytest.approx(want, rel=1e-6)


def test_qwen3_vl_shape_runs_the_predict_rows():
    # the qwen3-vl-8b device rows take this path: deepstack features cached, 16 px patches merged 2x2
    result = run_bench("predict", "tiny-qwen3-vl", batch_size=2, n_images=4, reference=False)
    assert result["settings"]["image_grid_thw"] == (1, 8, 8)  # 128 px / 16 px
    assert [r["caches"] for r in result["rows"]] == ["plain", "fresh", "warm"]
    assert all(r["same_predictions_as_first_score_row"] for r in result["rows"])
    with pytest.raises(ValueError, match="multiple of 32 px"):
        run_bench("predict", "tiny-qwen3-vl", resolution=112)


def test_predict_bench_rows_agree():
    result = run_bench("predict", "tiny", batch_size=2, n_images=4, reference=False, predict_batch_sizes=(4,))
    rows = result["rows"]
    assert [r["caches"] for r in rows] == ["plain", "fresh", "warm"] * 2
    assert all(r["same_predictions_as_first_score_row"] for r in rows)
    assert rows[2]["flops_per_image"] < rows[0]["flops_per_image"]  # warm: no vision forward counted


def test_command_line_prints_the_summary(tmp_path, capsys):
    """`python -m vlmexp.bench predict ...` once died printing its summary (UnboundLocalError) after
    the rows were measured: the command line, not only run_bench, must reach its last line."""
    import json

    from vlmexp.bench.__main__ import main

    out = tmp_path / "p.json"
    main(["predict", "tiny", "--images", "4", "--batch-size", "2", "--no-reference", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])  # the summary, as JSON
    assert out.exists()


def test_a_profiled_steady_state_leaves_the_profiled_steps_out():
    """Run V's cached rate (7.4 samples/s against ~43) timed the profiler: its steps and its seconds
    (profiling, writing the table) are left out of the rate."""
    from vlmexp.bench.profile import StepProfiler, unprofiled_rate

    prof = StepProfiler("row", start=5, n=3, batch_size=4)
    assert unprofiled_rate(8, 4, 10.0, None) == unprofiled_rate(8, 4, 10.0, prof) == 3.2
    prof.seconds = 6.0  # 3 profiled steps of the 8 took 6 of the 10 s
    assert unprofiled_rate(8, 4, 10.0, prof) == 5 * 4 / 4.0


def test_vision_bench_rows_keep_the_towers_features():
    """Every lever row of `exp bench vision` (compiled row left out: inductor on a CPU) gives the eager
    tower's features; the host-inputs row runs the tower as the vision feature cache calls it."""
    from vlmexp.bench.vision_bench import ROWS, vision_bench

    rows = ROWS[:-1]
    assert rows[-1] == "padded-host-inputs"
    result = vision_bench("tiny", n_images=3, resolution=112, reps=1, rows=rows)
    assert [r["path"] for r in result["rows"]] == list(rows)
    for r in result["rows"]:
        assert r["images_per_s"] > 0
        assert r["max_abs_diff_vs_eager"] <= 1e-4 * max(1.0, r["max_abs_feature"]), r
    with pytest.raises(ValueError, match="prefix"):
        vision_bench("tiny", rows=("padded",))
