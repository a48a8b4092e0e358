"""`exp bench run` on the CPU: a whole 2-fold run of a tiny model on a small demo, timed by phase."""

from __future__ import annotations

import json

from vlmexp.bench.whole_run import bench_run, cached_train_flops

# Phases a CPU run with a frozen vision tower must show (compile only happens with speed.compile on CUDA).
RUN_PHASES = {
    "prepare",
    "load_model",
    "encode",
    "vision_tower",
    "train_steps",
    "validation",
    "save",
    "predict_oof",
    "predict_test",
    "finalize",
}


def test_bench_run_phases_are_all_there_and_add_up_to_at_most_the_wall(tmp_path):
    out = tmp_path / "run.json"
    result = bench_run(
        "tiny:qwen2_vl",
        folds=2,
        epochs=1,
        train_rows=24,
        test_rows=12,
        overrides=("predict.batch_size=12", "train.logging_steps=50"),
        steady_steps=1,
        reference=True,
        reference_folds=1,
        workdir=tmp_path / "work",
        out=out,
    )
    project = result["project"]
    assert RUN_PHASES <= set(project["phases"]), set(project["phases"])
    phases = project["phases"]
    assert all(s > 0 for name, s in phases.items() if name != "predict_oof")
    # OOF rows are the kept epoch's validation table: no second prediction, so (almost) no time
    assert 0 <= phases["predict_oof"] < 0.1 * phases["validation"]
    assert sum(project["phases"].values()) <= project["wall_s"]
    assert project["other_s"] >= 0
    assert project["train_samples"] == 24  # two folds of 12 training rows, one epoch
    assert project["samples_per_s"] == project["train_samples"] / project["wall_s"]

    ref = result["reference"]
    assert {"load_model", "train_steps", "predict_oof", "predict_test"} <= set(ref["phases"])
    assert sum(ref["phases"].values()) <= ref["wall_s"]
    assert ref["extrapolated"] and ref["folds_run"] == 1
    assert ref["wall_s_k_folds"] == ref["wall_s"] * 2

    steady = result["steady_state"]["samples_per_s_cached"]
    assert result["ratios"]["run_vs_steady_state"] == project["samples_per_s"] / steady
    assert result["steady_state"]["flops_per_sample_cached"] > 0
    assert "mfu_cached" not in result["steady_state"]  # no measured bf16 peak on the CPU
    assert json.loads(out.read_text())["ratios"] == result["ratios"]


def test_cached_train_flops_counts_each_row_at_its_own_size(tiny_models):
    """The steady state's MFU divides by these FLOPs: a row with a larger image (more image tokens)
    or a longer answer costs more, the figure is the mean over rows, not the first row's count, and
    the cached tower's forward is left out."""
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    from vlmexp.bench import flops

    folder = tiny_models("qwen2_vl")
    processor, config = AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)

    def sample(side: int, answer: str = "cat") -> dict:
        user = [{"type": "image"}, {"type": "text", "text": "Which label?"}]
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        return {"messages": msgs, "images": [Image.new("RGB", (side, side), "red")]}

    small, large, longer = sample(56), sample(112), sample(56, "cat cat cat")
    f_small = cached_train_flops(config, processor, [small])
    f_large = cached_train_flops(config, processor, [large])
    assert f_large > f_small > 0
    assert cached_train_flops(config, processor, [small, large]) == (f_small + f_large) / 2
    assert cached_train_flops(config, processor, [longer]) > f_small
    enc = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[small["images"]], return_tensors="pt"
    )
    count = flops.count(config, 64, tuple(int(x) for x in enc["image_grid_thw"][0]))
    assert count.vision_fwd > 0 and cached_train_flops(config, processor, [small]) < count.train(1, False)
