"""`python -m vlmexp.bench train|predict|qlora SHAPE [options]` and `python -m vlmexp.bench run
--model SHAPE|tiny:FAMILY [--folds 5] [--epochs 2] [--set key=value ...]`: the bench without the `exp`
CLI (used by scripts/device_bench.sh on the GPU machine, where the project is not pip-installed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmexp.bench.shapes import SHAPES


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vlmexp.bench")
    p.add_argument("kind", choices=["train", "predict", "qlora", "run", "vision"])
    p.add_argument("shape", nargs="?", help=f"one of {', '.join(SHAPES)} (run: also tiny:<family>)")
    p.add_argument("--model", help="run: a bench shape or tiny:<family> (same as SHAPE)")
    p.add_argument("--folds", type=int, default=5, help="run: K")
    p.add_argument("--epochs", type=float, default=2.0, help="run: train.epochs")
    p.add_argument("--train-rows", type=int, default=400, help="run: demo training images")
    p.add_argument("--test-rows", type=int, default=200, help="run: demo test images")
    p.add_argument("--set", nargs="*", default=[], help="run: config overrides, e.g. speed.compile=true")
    p.add_argument("--steady-steps", type=int, default=8, help="run: step-bench steps (0: skip)")
    p.add_argument("--reference-folds", type=int, help="run: tutorial folds actually run (default K)")
    p.add_argument("--parts", default="project,steady,reference", help="run: which of the three to run")
    p.add_argument("--resolution", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modules", default="language,all-linear")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--compile", action="store_true", help="add a speed.compile=true row (train and predict)")
    p.add_argument("--only-rows", action="store_true", help="no default project row, only --rows")
    p.add_argument("--rows", nargs="*", default=[], help='extra rows, e.g. "b16:batch_size=16,compile=true"')
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--images", type=int)
    p.add_argument("--predict-batch-sizes", default="")
    p.add_argument("--out", type=Path)
    p.add_argument("--workdir", type=Path, help="run: reuse this folder's demo and saved model")
    a = p.parse_args(argv)
    shape = a.model or a.shape
    if not shape:
        p.error("give a SHAPE (or --model for run), e.g. qwen2.5-vl-3b")
    if a.kind == "run":
        from vlmexp.bench.whole_run import bench_run
        from vlmexp.bench.whole_run import summary as run_summary

        result = bench_run(
            shape,
            folds=a.folds,
            epochs=a.epochs,
            train_rows=a.train_rows,
            test_rows=a.test_rows,
            resolution=a.resolution or 448,
            overrides=tuple(a.set) + ((f"train.batch_size={a.batch_size}",) if a.batch_size else ()),
            steady_steps=a.steady_steps if "steady" in a.parts else 0,
            reference="reference" in a.parts and not a.no_reference,
            reference_folds=a.reference_folds,
            project="project" in a.parts,
            workdir=a.workdir,
            out=a.out,
        )
        print(json.dumps(run_summary(result), indent=1))
        return result
    if a.kind == "vision":
        from vlmexp.bench.vision_bench import vision_bench
        from vlmexp.tables import write_json

        result = vision_bench(shape, n_images=a.images or 32, resolution=a.resolution or 448)
        if a.out:
            write_json(result, a.out)
        print(json.dumps(result["rows"], indent=1))
        return result
    if a.kind == "qlora":
        from vlmexp.bench.run import qlora_memory
        from vlmexp.tables import write_json

        result = qlora_memory(shape, batch_size=a.batch_size or 1, steps=a.steps)
        if a.out:
            write_json(result, a.out)
    else:
        from vlmexp.bench.run import run_bench

        result = run_bench(
            a.kind,
            shape,
            resolution=a.resolution,
            tokens=a.tokens,
            batch_size=a.batch_size,
            steps=a.steps,
            warmup=a.warmup,
            modules=tuple(a.modules.split(",")),
            ablations=a.ablations,
            compile_row=a.compile,
            rows_spec=tuple(a.rows),
            predict_compile=a.compile,
            only_rows=a.only_rows,
            reference=not a.no_reference,
            n_images=a.images,
            predict_batch_sizes=tuple(int(x) for x in a.predict_batch_sizes.split(",") if x),
            out=a.out,
        )
    print(json.dumps(summary(result), indent=1))
    return result


def summary(result: dict) -> dict:
    """The figures worth reading at a glance (the full dict, losses included, goes to --out)."""
    keep = (
        "path",
        "modules",
        "samples_per_s",
        "samples_per_s_cached",
        "images_per_s",
        "mfu",
        "mfu_cached",
        "peak_gib",
        "gradient_checkpointing",
        "gc_reason",
        "batch_size",
        "max_loss_diff_vs_reference",
        "same_predictions_as_first_score_row",
    )
    rows = [{k: r[k] for k in keep if k in r} for r in result.get("rows", [])]
    extra = {k: result[k] for k in ("peak_gib", "weights_gib", "losses") if k in result}
    return {
        "kind": result["kind"],
        "shape": result["shape"],
        "rows": rows,
        "ratios": result.get("ratios"),
        **extra,
    }


if __name__ == "__main__":
    main()
