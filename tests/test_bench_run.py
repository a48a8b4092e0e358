"""`exp bench run` on the CPU: a whole 2-fold run of a tiny model on a small demo, timed by phase."""

from __future__ import annotations

import json

from vlmexp.bench.whole_run import bench_run

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
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
