"""`exp export RUN --average-folds`: the folds' LoRA adapters as one adapter whose weight update is the
mean of theirs, for a final inference budget of one model.

Averaging A and B separately would be wrong: every fold starts from its own random A, so
mean(B) @ mean(A) pairs fold 1's B with fold 2's A. The mean of the updates, (1/K) sum_k s B_k A_k,
is exactly one LoRA of rank K*r: A = [A_1; ...; A_K] stacked along the rank, B = [B_1 ... B_K] / K
side by side, and the same scaling s (lora_alpha grows with r so that alpha/r, or alpha/sqrt(r)
with rslora, stays). Fully trained modules (`modules_to_save`, e.g. lm_head) and trained biases are
plain means. The merged averaged model is therefore W0 + mean_k(delta W_k): the mean of the fold
models' weights. Five folds at r=16 give r=80, still a small adapter; export merges it anyway.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from vlmexp.config import ConfigError
from vlmexp.engine.cls_head import average_heads, has_head
from vlmexp.metrics import score

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Settings every fold's adapter must share to be averaged (target_modules compared as a set).
SAME = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "bias", "task_type")


class AverageError(ConfigError):
    """The adapters named cannot be averaged into one (the CLI prints it as one line); the message says
    which fold differs and how."""


def _config(adapter: Path) -> dict:
    path = adapter / CONFIG
    if not path.exists() or not (adapter / WEIGHTS).exists():
        raise AverageError(
            f"{adapter} holds no LoRA adapter ({CONFIG} and {WEIGHTS}); was it trained with LoRA?"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _as_set(value) -> object:
    return sorted(value) if isinstance(value, list) else value


def _check(configs: list[dict], adapters: list[Path]) -> None:
    first = configs[0]
    if (
        first.get("use_dora")
        or first.get("rank_pattern")
        or first.get("alpha_pattern")
        or first.get("target_parameters")
    ):
        raise AverageError(
            f"{adapters[0]} uses DoRA, per-module ranks or LoRA on parameters; fold averaging supports "
            "plain LoRA adapters only"
        )
    for adapter, c in zip(adapters[1:], configs[1:], strict=True):
        keys = [*SAME, "target_modules", "modules_to_save", "use_dora", "rank_pattern", "alpha_pattern"]
        differ = [k for k in keys if _as_set(c.get(k)) != _as_set(first.get(k))]
        if differ:
            shown = "; ".join(f"{k}: {first.get(k)!r} vs {c.get(k)!r}" for k in differ[:3])
            raise AverageError(
                f"{adapter} differs from {adapters[0]} in {', '.join(differ)} ({shown}); only folds of one "
                "run (same base model and LoRA targets) can be averaged"
            )


def average_adapters(adapters: list[Path], out_dir: Path, *, force: bool = False) -> Path:
    """Write the mean-update adapter of `adapters` (fold adapter folders) to `out_dir`; returns it.
    Other files of the first adapter folder (the processor) are copied beside it."""
    adapters, out_dir = [Path(a) for a in adapters], Path(out_dir)
    if not adapters:
        raise AverageError("no adapters to average")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --force to overwrite it")
    configs = [_config(a) for a in adapters]
    _check(configs, adapters)
    states = [load_file(a / WEIGHTS) for a in adapters]
    for adapter, sd in zip(adapters[1:], states[1:], strict=True):
        if sd.keys() != states[0].keys() or any(sd[k].shape != states[0][k].shape for k in sd):
            raise AverageError(f"{adapter} holds other tensors than {adapters[0]}; were they trained alike?")

    n = len(adapters)
    merged: dict[str, torch.Tensor] = {}
    for key, t in states[0].items():
        group = [sd[key] for sd in states]
        if ".lora_A." in key or ".lora_embedding_A" in key:
            merged[key] = torch.cat(group, dim=0).contiguous()  # ranks stacked: (K*r, in)
        elif ".lora_B." in key or ".lora_embedding_B" in key:
            merged[key] = (torch.cat([g.float() for g in group], dim=1) / n).to(t.dtype).contiguous()
        else:  # modules_to_save and trained biases
            merged[key] = torch.stack([g.float() for g in group]).mean(0).to(t.dtype)

    config = dict(configs[0])
    config["r"] = configs[0]["r"] * n
    # Same scaling as each fold: alpha/r (or alpha/sqrt(r) with rslora) with r grown K times.
    grow = math.sqrt(n) if configs[0].get("use_rslora") else n
    config["lora_alpha"] = configs[0]["lora_alpha"] * grow

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for f in adapters[0].iterdir():
            if f.is_file() and f.name not in (WEIGHTS, CONFIG, "README.md"):
                shutil.copy2(f, tmp / f.name)
        save_file(merged, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if all(has_head(a) for a in adapters):  # model.head=cls: the mean head, not fold 0's copy
            average_heads(adapters, tmp)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
        (tmp / "averaged_from.json").write_text(
            json.dumps([str(a) for a in adapters], indent=2), encoding="utf-8"
        )
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def score_beside_ensemble(
    averaged: pd.DataFrame, ensemble: pd.DataFrame, labels: list[str], truth=None
) -> dict:
    """The averaged model's test predictions beside the fold ensemble's (`test_probs.csv`): how often they
    agree and, with known answers (data.answers_csv), both test scores. The folds' own rows cannot
    score it: the averaged model was trained on every one of them."""
    avg = averaged.set_index(averaged["id"].astype(str))["pred"]
    ens = ensemble.set_index(ensemble["id"].astype(str))["pred"].reindex(avg.index)
    out = {"test_rows": len(avg), "agreement_with_fold_ensemble": float((avg == ens).mean())}
    if truth is not None:
        truth = truth[truth.index.isin(avg.index)]
        if len(truth):
            for who, pred in (("averaged", avg), ("fold_ensemble", ens)):
                got = score(truth, pred.reindex(truth.index), labels)
                out |= {f"{who}_test_accuracy": got["accuracy"], f"{who}_test_macro_f1": got["macro_f1"]}
    return out


def score_averaged(run, cfg, adapter: Path) -> dict:
    """Predict the test set with the averaged adapter as the run's folds did (prompt, OCR, TTA) and put
    it beside the fold ensemble; written to <run>/export/averaged_score.json."""
    from vlmexp.data import read_answers
    from vlmexp.recipe import predict_test_with  # the recipe's own prediction path, loaded only here
    from vlmexp.tables import read_table, write_json, write_table

    averaged = predict_test_with(cfg, run, adapter)
    write_table(averaged, run.path("export") / "averaged_test.csv")
    truth = read_answers(cfg.data) if cfg.data.answers_csv else None
    labels = [c[2:] for c in averaged.columns if c.startswith("p:")]
    result = score_beside_ensemble(averaged, read_table(run.path("test_probs.csv")), labels, truth)
    write_json(result, run.path("export") / "averaged_score.json")
    return result
