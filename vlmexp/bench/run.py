"""`run_bench`: one entry point for `exp bench train|predict`, returning (and optionally saving) a dict.

Rows carry samples/s (images/s for prediction), tokens/s, MFU and peak memory; `ratios` compares each
project row with the reference row on the same LoRA modules. FLOP accounting: vlmexp/bench/flops.py.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from vlmexp.bench import flops, predict_bench, train_bench
from vlmexp.bench.answer_only_loss import answer_only_loss
from vlmexp.bench.shapes import build_model, build_processor, count_params, get_shape
from vlmexp.bench.synth import collate_train, image_tokens, labels, make_samples
from vlmexp.engine import vision_speed
from vlmexp.tables import write_json

KINDS = ("train", "predict")


def environment() -> dict:
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "device": flops.device_name(),
        "python": platform.python_version(),
        "versions": versions,
        "peak_tflops_measured": flops.measured_peak(),
        "peak_tflops_datasheet": flops.datasheet_peak(),
        "argv": sys.argv,
    }


def _mfu(flops_per_item: float, items_per_s: float, peak: float | None) -> float | None:
    return flops_per_item * items_per_s / (peak * 1e12) if peak else None


def _compare(row: dict, refs: list[dict]) -> None:
    """Attach the reference row of the same batch size (else the first) and the loss-curve gap."""
    if row["path"] == "reference" or not refs:
        return
    ref = next((r for r in refs if r["batch_size"] == row["batch_size"]), refs[0])
    row["vs_reference"] = {"batch_size": ref["batch_size"], "samples_per_s": ref["samples_per_s"]}
    if ref["batch_size"] == row["batch_size"]:
        n = min(len(ref["losses"]), len(row["losses"]))
        row["max_loss_diff_vs_reference"] = max(
            abs(a - b) for a, b in zip(ref["losses"][:n], row["losses"][:n], strict=True)
        )


def parse_row(spec: str) -> dict:
    """An extra row, "name:key=value,...": keys are speed.* fields or batch_size, e.g.
    "project-compile-b16:compile=true,batch_size=16"; a name starting with "reference" adds a
    reference row, e.g. "reference-b16:batch_size=16"."""
    name, _, body = spec.partition(":")
    row: dict = {"name": name, "speed": {}}
    if name.startswith("reference"):
        row["kind"] = "reference"
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        if key == "batch_size":
            row["batch_size"] = int(value)
        else:
            row["speed"][key] = parsed
    return row


def run_bench(
    kind: str,
    shape: str,
    *,
    resolution: int | None = None,
    tokens: int | None = None,
    batch_size: int | None = None,
    steps: int = 8,
    warmup: int = 2,
    modules: tuple[str, ...] = ("language", "all-linear"),
    ablations: bool = False,
    compile_row: bool = False,
    rows_spec: tuple[str, ...] = (),
    predict_compile: bool = False,
    only_rows: bool = False,
    reference: bool = True,
    n_labels: int = 25,
    n_images: int | None = None,
    predict_batch_sizes: tuple[int, ...] = (),
    lr: float = 2e-4,
    seed: int = 0,
    out: Path | None = None,
) -> dict:
    """Benchmark `kind` (train or predict) on `shape` (see bench/shapes.py: qwen2.5-vl-3b, qwen2-vl-7b,
    qwen3-vl-8b, gemma-3-4b, tiny, tiny-qwen3-vl, tiny-gemma3); rows for the reference recipe and the
    project's path in the same process."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
    sh = get_shape(shape)
    res = resolution or sh.defaults["resolution"]
    n_tok = tokens or sh.defaults["tokens"]
    bs = batch_size or sh.defaults["batch_size"]
    cuda = torch.cuda.is_available()
    env = environment()
    peak = env["peak_tflops_measured"]
    model = build_model(sh, "cuda" if cuda else "cpu", torch.bfloat16 if cuda else torch.float32, seed=seed)
    processor = build_processor(sh, res)
    n = n_images or (warmup + steps) * bs
    bs_max = max([bs] + [parse_row(r).get("batch_size", bs) for r in rows_spec])
    samples = make_samples(processor, max(n, (warmup + steps) * bs_max), res, n_tok, n_labels, seed)
    probe = collate_train(processor, samples[:bs])
    tok_per_sample = float(probe["attention_mask"].sum(1).float().mean())
    answer_tokens = float((probe["labels"] != -100).sum(1).float().mean())
    # Qwen: the image's patch grid, e.g. (1, 32, 32) at 448 px; Gemma 3 has none (a fixed 896 px)
    grid = tuple(int(x) for x in probe["image_grid_thw"][0]) if "image_grid_thw" in probe else None
    count = flops.count(model.config, round(tok_per_sample), grid)
    result = {
        "kind": kind,
        "shape": shape,
        "params": count_params(model),
        "env": env,
        "settings": {
            "resolution": res,
            "tokens_per_sample": tok_per_sample,
            "answer_tokens": answer_tokens,
            "image_grid_thw": grid,
            "image_tokens": image_tokens(processor, res),
            "batch_size": bs,
            "steps": steps,
            "warmup": warmup,
            "n_labels": n_labels,
            "lr": lr,
            "seed": seed,
        },
        "rows": [],
        "ratios": {},
    }

    def save() -> None:
        if out is not None:
            write_json(result, out)

    if kind == "train":
        kw = dict(batch_size=bs, warmup=warmup, steps=steps, lr=lr, seed=seed)
        for mod in modules:
            fl = count.train(answer_tokens, vision_trainable=mod == "all-linear")
            # With the tower's features cached it does not run: its forward is not counted then.
            fl_cached = fl - (count.vision_fwd if mod == "language" else 0)
            variants = [] if only_rows else [dict(name="project")]
            if ablations:  # one lever of build_trainer switched back at a time
                variants += [dict(name="project-plain-data", speed=dict(encode_once=False))]
                if mod == "language":
                    variants += [dict(name="project-no-vision-cache", speed=dict(vision_cache="off"))]
            if compile_row:
                variants += [dict(name="project-compile", speed=dict(compile=True))]
            variants += [parse_row(spec) for spec in rows_spec]
            refs = [dict(kind="reference", batch_size=bs)] if reference else []
            refs += [v for v in variants if v.get("kind") == "reference"]
            projects = [v for v in variants if v.get("kind") != "reference"]
            for v in refs + projects:  # references first: each row is compared with one
                if v.get("kind") == "reference":
                    args = kw | {"batch_size": v.get("batch_size", bs)}
                    row, model = train_bench.reference_row(model, processor, samples, modules=mod, **args)
                else:
                    args = kw | v
                    row, model = train_bench.project_row(model, processor, samples, modules=mod, **args)
                row |= {
                    "batch_size": args["batch_size"],
                    "flops_per_sample": fl,
                    "tokens_per_s": row["samples_per_s"] * tok_per_sample,
                    "mfu": _mfu(fl, row["samples_per_s"], peak),
                }
                if "samples_per_s_cached" in row:
                    fl_c = fl_cached if row.get("vision_cache") else fl
                    row |= {
                        "flops_per_sample_cached": fl_c,
                        "mfu_cached": _mfu(fl_c, row["samples_per_s_cached"], peak),
                    }
                _compare(row, [r for r in result["rows"] if r["path"] == "reference" and r["modules"] == mod])
                if "vs_reference" in row:
                    base = row["vs_reference"]["samples_per_s"]
                    result["ratios"][f"{row['path']}/{mod}"] = row["samples_per_s"] / base
                    result["ratios"][f"{row['path']}/{mod}/cached"] = row["samples_per_s_cached"] / base
                result["rows"].append(row)
                save()  # after every row: a later row that fails loses nothing
    else:
        fl = count.prefill()
        names = labels(n_labels)
        bs_pred = max((bs, *predict_batch_sizes))  # the compile row runs at the largest batch only

        def add(row: dict) -> None:  # figures of the row, its ratio to the reference, saved at once
            cached = row.get("vision_cache")
            row["flops_per_image"] = fl - (count.vision_fwd if cached else 0)
            row["tokens_per_s"] = row["images_per_s"] * tok_per_sample
            row["mfu"] = _mfu(row["flops_per_image"], row["images_per_s"], peak)
            if reference:
                ref = result["rows"][0] if result["rows"] else row
                result["ratios"][f"{row['path']}/b{row['batch_size']}"] = (
                    row["images_per_s"] / ref["images_per_s"]
                )
            result["rows"].append(row)
            save()

        if reference:
            add(predict_bench.generate_row(model, processor, samples[:n], names, batch_size=bs, warmup=1))
        model.eval().requires_grad_(False)
        vision_speed.patch_vision_attention(model)
        scores = None
        for b in (bs, *predict_batch_sizes):
            modes = [
                m for m in predict_bench.MODES if m != "warm-compile" or (predict_compile and b == bs_pred)
            ]
            for mode in modes:
                row, outs = predict_bench.score_row(
                    model, processor, samples[:n], names, batch_size=b, warmup=1, mode=mode
                )
                preds = torch.cat([torch.as_tensor(o) for o in outs]).argmax(-1)
                scores = preds if scores is None else scores
                row["same_predictions_as_first_score_row"] = bool((preds == scores).all())
                add(row)
    return result


def qlora_memory(
    shape: str = "qwen2-vl-7b",
    *,
    batch_size: int = 1,
    steps: int = 4,
    resolution: int = 448,
    tokens: int = 570,
    workdir: Path | None = None,
    seed: int = 0,
) -> dict:
    """QLoRA through the project's own loader (`models.load.load_model`, quant=4bit): save random bf16
    weights, reload them in NF4, train `steps` steps with the fast loss; reports peak GPU memory."""
    from vlmexp.config import Config
    from vlmexp.models.load import load_model

    sh = get_shape(shape)
    work = Path(workdir or tempfile.mkdtemp(prefix="vlmexp-qlora-"))
    model = build_model(sh, "cuda", torch.bfloat16, seed=seed)
    processor = build_processor(sh, resolution)
    model.save_pretrained(work)
    processor.save_pretrained(work)
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = Config()
    cfg = replace(
        cfg,
        model=replace(cfg.model, name=str(work), quant="4bit", attn="sdpa"),
        lora=replace(cfg.lora, r=16, dropout=0.0),
    )
    model = load_model(cfg, training=True)
    weights_gib = torch.cuda.max_memory_allocated() / 2**30
    vision_speed.patch_vision_attention(model)
    samples = make_samples(processor, batch_size * steps, resolution, tokens, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    losses = []
    for i in range(steps):
        b = collate_train(processor, samples[i * batch_size : (i + 1) * batch_size])
        b = {k: v.cuda() for k, v in b.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = answer_only_loss(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {
        "kind": "qlora-memory",
        "shape": shape,
        "batch_size": batch_size,
        "gradient_checkpointing": False,
        "weights_gib": weights_gib,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
        "env": environment(),
    }
