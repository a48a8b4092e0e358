"""`exp bench run`: a whole `exp run` (K folds: training, validation, OOF and test prediction,
finalize) timed by phase, against the step benchmark's steady state and the tutorial recipe as a
K-fold loop, in one process.

- **project**: `recipe.run_experiment` on the demo competition (`demo.make_demo`) with a random-weight
  model saved to a local folder first (`bench/shapes.py`, e.g. qwen2.5-vl-3b) or a tiny one
  (`tiny:qwen2_vl`), inside `timing.recording()`: the phases the recipe and engine mark, what no
  phase claims as "other", training samples (rows x epochs, all folds) per wall second.
- **steady_state**: `train_bench.project_row` on the same saved weights and the run's own training
  samples at the run's batch size: the cached pass's samples/s, what the run's steps could reach,
  and its MFU (`cached_train_flops`: each row at its own size) against the measured bf16 peak.
- **reference**: the tutorial recipe per fold (the same fold split, LoRA modules, batch size, lr and
  epochs, so the work is equal; everything else trl's defaults: gradient checkpointing on, trl's
  collator, messages + assistant_only_loss), then HF `generate` of the longest label's tokens and
  parsing for the held-out fold and the test set, without the project's vision patch. With
  `reference_folds` < K its per-fold mean is scaled to K folds ("extrapolated" says so).
"""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path

import pandas as pd
import torch

from vlmexp import timing
from vlmexp.tables import read_json, read_table, write_json

log = logging.getLogger(__name__)


def bench_run(
    model: str = "qwen2.5-vl-3b",
    *,
    folds: int = 5,
    epochs: float = 2.0,
    train_rows: int = 400,
    test_rows: int = 200,
    resolution: int = 448,
    overrides: tuple[str, ...] = (),
    steady_steps: int = 8,
    reference: bool = True,
    reference_folds: int | None = None,
    project: bool = True,
    workdir: Path | None = None,
    out: Path | None = None,
) -> dict:
    """Run the three parts (see the module docstring) and return (and save after each) the result."""
    from vlmexp.bench.run import environment
    from vlmexp.config import load_config
    from vlmexp.demo import make_demo

    work = Path(workdir or tempfile.mkdtemp(prefix="vlmexp-bench-run-"))
    # A second bench in the same `workdir` (a new process: torch.compile's on-disk caches warm, as for
    # a user's second `exp run` on the machine) reuses the demo and the saved weights, not the runs.
    data = work / "demo"
    if not (data / "train.csv").exists():
        make_demo(data, n_train=train_rows, n_test=test_rows)
    model_name = _saved_model(model, work, resolution)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    cfg = load_config(
        [
            f"model.name={model_name}",
            f"model.cache_dir={work / 'tiny'}",
            f"folds={folds}",
            f"train.epochs={epochs}",
            f"data.dir={data}",
            "data.answers_csv=test_answers.csv",
            f"runs_dir={runs}",
            f"leaderboard={runs / 'leaderboard.csv'}",
            *overrides,
        ]
    )
    result: dict = {
        "kind": "run",
        "model": model,
        "env": environment(),
        "settings": {
            "folds": folds,
            "epochs": epochs,
            "train_rows": train_rows,
            "test_rows": test_rows,
            "resolution": resolution,
            "overrides": list(overrides),
        },
        "ratios": {},
    }

    def save() -> None:  # after each part, which also lets go of its models and caches
        if out is not None:
            write_json(result, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if project:
        result["project"] = project_run(cfg)
        save()
    if steady_steps > 0:
        batch = result["project"]["batch_size"] if project else cfg.train.batch_size
        row = result["steady_state"] = steady_state(cfg, batch, steady_steps)
        peak = result["env"]["peak_tflops_measured"]
        if peak and row["flops_per_sample_cached"]:
            # MFU of the cached step against the bf16 matmul peak measured in this process
            row["mfu_cached"] = row["flops_per_sample_cached"] * row["samples_per_s_cached"] / (peak * 1e12)
        if project:
            steady = result["steady_state"]["samples_per_s_cached"]
            result["ratios"]["run_vs_steady_state"] = result["project"]["samples_per_s"] / steady
        save()
    if reference:
        result["reference"] = tutorial_kfold(cfg, reference_folds)
        if project:
            result["ratios"]["reference_wall_over_run_wall"] = (
                result["reference"]["wall_s_k_folds"] / result["project"]["wall_s"]
            )
        save()
    return result


def _saved_model(model: str, work: Path, resolution: int) -> str:
    """model.name for the run: tiny:<family> as it is, a bench shape saved to `work/model` (bf16 on
    CUDA), as a user's downloaded checkpoint would sit on disk, so loading it is measured too."""
    if model.startswith("tiny:"):
        return model
    from vlmexp.bench.shapes import build_model, build_processor, get_shape

    if (work / "model" / "config.json").exists():
        return str(work / "model")  # saved by an earlier bench in this workdir
    sh = get_shape(model)
    cuda = torch.cuda.is_available()
    m = build_model(sh, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    m.save_pretrained(work / "model")
    build_processor(sh, resolution).save_pretrained(work / "model")
    del m
    if cuda:
        torch.cuda.empty_cache()
    return str(work / "model")


def project_run(cfg) -> dict:
    """`exp run` as a user runs it, phases recorded; samples/s counts rows x epochs of every fold."""
    from vlmexp.recipe import run_experiment

    _reset_peak()
    with timing.recording() as timer:
        run = run_experiment(cfg)
    report = timer.report()
    metrics = [read_json(run.fold_dir(k) / "metrics.json") for k in range(cfg.folds)]
    train_samples = sum(m["train_rows"] for m in metrics) * cfg.train.epochs
    oof = read_table(run.path("oof.csv"))
    cv = read_json(run.cv_path)
    return {
        **report,
        "run_dir": str(run.root),
        "batch_size": metrics[0].get("batch_size", cfg.train.batch_size),
        "train_samples": train_samples,
        "samples_per_s": train_samples / report["wall_s"],
        "predicted_images": len(oof) + cfg.folds * len(read_table(run.path("test_probs.csv"))),
        "fold_train_seconds": [m["train_seconds"] for m in metrics],
        "cv": {k: cv[k] for k in ("metric", "mean", "std", "accuracy", "macro_f1")},
        "peak_gib": _peak_gib(),
    }


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _competition_samples(cfg):
    """(competition, samples(frame, answer=True)): the run's samples of any rows of it."""
    from vlmexp.data import load_competition
    from vlmexp.engine.samples import build_samples
    from vlmexp.prompts.render import load_template

    comp = load_competition(cfg.data)
    template = load_template(cfg.prompt, cfg.prompts.dir)

    def samples(frame: pd.DataFrame, answer: bool = True) -> list[dict]:
        return build_samples(
            frame,
            labels=comp.labels,
            descriptions=comp.descriptions,
            template=template,
            cfg=cfg,
            ocr=None,
            with_answer=answer,
            tree=comp.tree,
        )

    return comp, samples


def _resolved(cfg, model, processor, samples: list[dict]):
    """cfg with train.batch_size=auto resolved as build_trainer resolves it for these rows (and lr)."""
    from vlmexp.engine import autobatch
    from vlmexp.engine.train import training_dataset
    from vlmexp.engine.trainer import _probe_shape

    cuda = torch.cuda.is_available()
    shape = _probe_shape(cfg, processor, training_dataset(cfg, processor, samples[:32])) if cuda else None
    return autobatch.resolve(cfg, model, shape)


def steady_state(cfg, batch_size: int | str, steps: int, warmup: int = 2) -> dict:
    """The step benchmark (`train_bench.project_row`, language-only LoRA r=16) on the run's saved base
    weights and its own training rows: `samples_per_s_cached` is the steady state of a step."""
    from vlmexp.bench.train_bench import project_row
    from vlmexp.models.load import load_model, load_processor

    comp, to_samples = _competition_samples(cfg)
    samples = to_samples(comp.train)
    base = load_model(cfg, training=False).requires_grad_(False)
    processor = load_processor(cfg)
    cuda = torch.cuda.is_available()
    if batch_size == "auto":
        batch_size = _resolved(cfg, base, processor, samples).train.batch_size
    need = (warmup + steps) * batch_size
    samples = (samples * (need // len(samples) + 1))[:need]  # small data: rows repeat (cached pass only)
    row, _ = project_row(
        base.train(),
        processor,
        samples,
        modules="language",
        batch_size=batch_size,
        warmup=warmup,
        steps=steps,
        lr=cfg.train.lr,
        seed=cfg.seed,
        speed=dict(vars(cfg.speed)),
    )
    config = base.config
    del base
    if cuda:
        torch.cuda.empty_cache()
    keep = ("samples_per_s", "samples_per_s_cached", "peak_gib", "gradient_checkpointing", "batch_size")
    return {k: row[k] for k in keep if k in row} | {
        "flops_per_sample_cached": cached_train_flops(config, processor, samples)
    }


def cached_train_flops(config, processor, samples: list[dict]) -> float | None:
    """Mean training FLOPs of one of `samples` (the run's samples) with the tower's features cached
    (language-only LoRA, `bench/flops.py`'s convention), each row counted at its own token count,
    answer length and image grid: the demo's images come in about 20 sizes, so one row's count would
    not do. Prompt and completion are tokenised apart, as trl's prompt-completion collator does. None
    for a model without an image grid (Gemma 3's fixed size: `flops.count` takes no grid there)."""
    from vlmexp.bench import flops
    from vlmexp.engine.samples import to_prompt_completion

    total = 0.0
    for sample in samples:
        row = to_prompt_completion(processor, sample)
        images = [row["images"]] if row["images"] else None
        prompt = processor(text=[row["prompt"]], images=images, return_tensors="pt", add_special_tokens=False)
        if "image_grid_thw" not in prompt:
            return None
        answer = len(processor.tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
        grid = tuple(int(x) for x in prompt["image_grid_thw"][0])
        count = flops.count(config, prompt["input_ids"].shape[1] + answer, grid)
        total += count.train(answer, vision_trainable=False) - count.vision_fwd
    return total / len(samples)


def tutorial_kfold(cfg, n_folds: int | None = None) -> dict:
    """The tutorial recipe on the run's fold split (the same stored assignment `exp run` uses), fold by
    fold, phases recorded."""
    from vlmexp.kfold.folds import assign_folds
    from vlmexp.metrics import score

    comp, samples = _competition_samples(cfg)
    store = Path(cfg.runs_dir) / "_folds"
    fold_of = assign_folds(comp.train, cfg.folds, cfg.fold_seed, store_dir=store)
    n = min(n_folds or cfg.folds, cfg.folds)
    test_samples = samples(comp.test, False)
    scores = []
    _reset_peak()
    with timing.recording() as timer:
        for k in range(n):
            val_ids = set(fold_of[fold_of == k].index)
            train_df = comp.train[~comp.train["id"].isin(val_ids)]
            val_df = comp.train[comp.train["id"].isin(val_ids)]
            preds = _tutorial_fold(
                cfg, samples(train_df), samples(val_df, False), test_samples, comp.labels, k
            )
            scores.append(score(val_df["label"].tolist(), preds, comp.labels)[cfg.metric])
    report = timer.report()
    return {
        **report,
        "folds_run": n,
        "extrapolated": n < cfg.folds,
        "wall_s_k_folds": report["wall_s"] / n * cfg.folds,
        "fold_scores": scores,
        "peak_gib": _peak_gib(),
        "recipe": "trl SFTTrainer (messages + assistant_only_loss, gradient checkpointing, trl collator), "
        "HF generate of the longest label's tokens + parsing",
    }


def _tutorial_fold(cfg, train_samples, val_samples, test_samples, labels, k: int) -> list[str | None]:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from vlmexp.models.load import load_model, load_processor

    cuda = torch.cuda.is_available()
    set_seed(cfg.seed + k)
    with timing.phase("load_model"):
        model = load_model(cfg, training=True)
        processor = load_processor(cfg)
    cfg = _resolved(cfg, model, processor, train_samples)  # the project's batch and lr for batch_size=auto
    ds = Dataset.from_list([{"messages": s["messages"], "images": s["images"]} for s in train_samples])
    with tempfile.TemporaryDirectory() as tmp, timing.phase("train_steps"):
        args = SFTConfig(
            output_dir=tmp,
            num_train_epochs=cfg.train.epochs,
            per_device_train_batch_size=cfg.train.batch_size,
            learning_rate=cfg.train.lr,
            gradient_checkpointing=True,
            bf16=cuda,
            use_cpu=not cuda,
            assistant_only_loss=True,
            max_length=None,
            save_strategy="no",
            report_to="none",
            seed=cfg.seed,
            disable_tqdm=True,
        )
        SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor).train()
    model.eval()
    with timing.phase("predict_oof"):
        preds = _generate_labels(model, processor, val_samples, labels, cfg.predict.batch_size)
    with timing.phase("predict_test"):
        _generate_labels(model, processor, test_samples, labels, cfg.predict.batch_size)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return preds


@torch.inference_mode()
def _generate_labels(model, processor, samples: list[dict], labels: list[str], batch_size: int):
    """processor -> greedy `generate` of as many tokens as the longest label + end of turn (random
    weights never stop on their own, so min_new_tokens pins the work a trained model does) -> parse."""
    from vlmexp.engine.samples import prompt_messages
    from vlmexp.prompts.render import parse_answer

    tok = processor.tokenizer
    n_new = max(len(tok(label, add_special_tokens=False)["input_ids"]) for label in labels) + 1
    preds: list[str | None] = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        texts = [
            processor.apply_chat_template(prompt_messages(s["messages"]), add_generation_prompt=True)
            for s in batch
        ]
        enc = processor(
            text=texts,
            images=[list(s["images"]) for s in batch],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        out = model.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        preds += [parse_answer(t, labels, batch[0]["rendered"].marker) for t in decoded]
    return preds


def summary(result: dict) -> dict:
    """The figures worth reading at a glance (the full result goes to --out)."""
    keep = ("wall_s", "phases", "other_s", "gc", "samples_per_s", "cv", "wall_s_k_folds", "extrapolated")
    parts = {
        p: {k: v for k, v in result[p].items() if k in keep} for p in ("project", "reference") if p in result
    }
    if "steady_state" in result:
        parts["steady_state"] = result["steady_state"]
    return {"kind": "run", "model": result["model"], **parts, "ratios": result["ratios"]}
