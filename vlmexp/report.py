"""Ablation report: is run B really better than baseline A, or is it fold noise?

Runs compare on their shared out-of-fold (OOF) samples, sample by sample: a paired bootstrap
gives a 95% CI of the metric delta and McNemar's test checks whether the two runs' errors
differ. Because every run on a dataset uses the same stored folds, per-fold deltas pair up too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy.stats import binomtest, chi2

from vlmexp import metrics, plots
from vlmexp.config import changes_results
from vlmexp.rundir import RunDir
from vlmexp.tables import PROB_PREFIX, read_table, write_text

METRICS = ("accuracy", "macro_f1")


class ReportError(ValueError):
    """A run folder cannot be reported on; the message says which and why."""


def _encode(y_true, pred_a, pred_b, labels: list[str] | None) -> tuple[np.ndarray, ...]:
    """Integer codes; a missing or unknown prediction becomes -1, which matches no class."""
    t, a, b = (metrics.as_labels(x) for x in (y_true, pred_a, pred_b))
    if not len(t) == len(a) == len(b):
        raise ValueError(f"lengths differ: y_true {len(t)}, pred_a {len(a)}, pred_b {len(b)}")
    labels = list(labels) if labels is not None else sorted(set(t))
    code = {label: i for i, label in enumerate(labels)}
    return tuple(np.array([code.get(v, -1) for v in x]) for x in (t, a, b)) + (len(labels),)


def _onehot(codes: np.ndarray, n_cls: int) -> np.ndarray:
    return (codes[:, None] == np.arange(n_cls)[None, :]).astype(float)  # code -1 -> all zeros


def _weighted_scores(
    w: np.ndarray, t: np.ndarray, preds: list[np.ndarray], n_cls: int, metric: str
) -> np.ndarray:
    """Metric of each prediction vector (columns) for each row of sample weights `w` (rows).

    A bootstrap resample is a row of counts (how often each sample was drawn), so every
    count the metrics need comes out of one matrix product `w @ features`. Macro-F1 per class
    is 2TP / (n_pred + n_true), 0 when both are 0: sklearn's f1_score(average="macro",
    zero_division=0), without 2000 sklearn calls.
    """
    true1 = _onehot(t, n_cls)
    feats = [true1]
    for p in preds:
        pred1 = _onehot(p, n_cls)
        feats += [pred1, pred1 * true1]
    counts = w @ np.concatenate(feats, axis=1)  # (rows, C * (1 + 2 * len(preds)))
    n_true = counts[:, :n_cls]
    out = []
    for k in range(len(preds)):
        n_pred = counts[:, n_cls * (1 + 2 * k) : n_cls * (2 + 2 * k)]
        tp = counts[:, n_cls * (2 + 2 * k) : n_cls * (3 + 2 * k)]
        if metric == "accuracy":
            out.append(tp.sum(axis=1) / w.sum(axis=1))
        else:
            denom = n_pred + n_true
            out.append(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(axis=1))
    return np.stack(out, axis=1)


def paired_bootstrap(
    y_true,
    pred_a,
    pred_b,
    labels: list[str] | None = None,
    metric: str = "accuracy",
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(delta, lo, hi): metric(B) - metric(A) on all samples and its 95% percentile CI.

    Each resample draws n sample indices with replacement (numpy default_rng(seed).integers,
    in one (n_boot, n) draw) and scores both runs on that same resample.
    """
    if metric not in METRICS:
        raise ValueError(f"metric '{metric}'; choose one of {', '.join(METRICS)}")
    t, a, b, n_cls = _encode(y_true, pred_a, pred_b, labels)
    n = len(t)
    if n == 0:
        raise ValueError("no shared samples to bootstrap")
    full = _weighted_scores(np.ones((1, n)), t, [a, b], n_cls, metric)[0]
    delta = float(full[1] - full[0])
    rng = np.random.default_rng(seed)
    deltas = []
    # Drawn in chunks of ~1M indices to bound memory; the stream equals one (n_boot, n) draw.
    step = max(1, 1_000_000 // n)
    for start in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - start), n))
        offsets = (np.arange(len(idx)) * n)[:, None]
        w = np.bincount((idx + offsets).ravel(), minlength=len(idx) * n).reshape(len(idx), n).astype(float)
        scores = _weighted_scores(w, t, [a, b], n_cls, metric)
        deltas.append(scores[:, 1] - scores[:, 0])
    lo, hi = np.percentile(np.concatenate(deltas), [2.5, 97.5])
    return delta, float(lo), float(hi)


def mcnemar(y_true, pred_a, pred_b) -> tuple[int, int, float, float]:
    """(b, c, statistic, p_value); b = A right and B wrong, c = A wrong and B right.

    b + c < 25: exact two-sided binomial test of b ~ Bin(b+c, 1/2) (scipy binomtest);
    statistic is then min(b, c). Otherwise the chi-square test with continuity correction,
    statistic (|b - c| - 1)^2 / (b + c) on 1 degree of freedom.
    """
    t, a, bb, _ = _encode(y_true, pred_a, pred_b, None)
    ra, rb = (a == t) & (a >= 0), (bb == t) & (bb >= 0)
    b, c = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    if b + c == 0:
        return b, c, 0.0, 1.0
    if b + c < 25:
        return b, c, float(min(b, c)), float(binomtest(b, b + c, 0.5).pvalue)
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    return b, c, float(stat), float(chi2.sf(stat, 1))


@dataclass
class Run:
    name: str
    config: dict
    cv: dict
    oof: pd.DataFrame
    labels: list[str]
    calibrated: bool = False  # oof/cv are the bias-calibrated table (ensemble.calibrate=bias)
    members: tuple[str, ...] = ()  # an `exp ensemble` run's member runs (its config.yaml is the first's)


def _flat(d: dict, prefix: str = "") -> dict:
    """Dotted keys of the settings that change results; `runs_dir`, `speed.*`, ... are not differences."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif changes_results(prefix + k):
            out[prefix + k] = v
    return out


def load_run(run_dir: Path, calibrated: bool = True) -> Run:
    """A finished run's OOF table and CV. A run made with ensemble.calibrate=bias (or `exp ensemble
    --calibrate bias`) submits calibrated predictions, so by default its cross-fitted calibrated OOF
    (oof_calibrated.csv) is what is compared; `calibrated=False` compares the raw argmax table."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise ReportError(f"{run.root} is not a run folder")
    unfinished = " (the run is not finished: resume it with exp run, or leave it out)"
    for path, hint in ((run.cv_path, unfinished), (run.path("oof.csv"), unfinished), (run.config_path, "")):
        if not path.exists():
            raise ReportError(f"{run.root} has no {path.name}{hint}")
    oof = read_table(run.path("oof.csv"))
    lacking = [c for c in ("id", "label", "fold", "pred") if c not in oof.columns]
    if lacking:
        raise ReportError(f"{run.path('oof.csv')} lacks columns {lacking}; is it a prediction table?")
    labels = [c[len(PROB_PREFIX) :] for c in oof.columns if c.startswith(PROB_PREFIX)]
    labels = labels or sorted(oof["label"].dropna().astype(str).unique())
    config = _flat(OmegaConf.to_container(OmegaConf.load(run.config_path)) or {})
    cv = run.cv()
    members = tuple(cv.get("members") or ())
    if calibrated and "calibrated" in cv:
        path = run.path("oof_calibrated.csv")
        if not path.exists():
            raise ReportError(
                f"{run.root}'s cv.json has a calibrated CV but no {path.name}: rerun `exp ensemble "
                f"{run.root} --calibrate bias --force`, or compare the raw table with --raw"
            )
        oof = read_table(path)
        cv = metrics.cv_summary(oof, labels, cv.get("metric", "macro_f1"))
        return Run(run.root.name, config, cv, oof, labels, calibrated=True, members=members)
    return Run(run.root.name, config, cv, oof, labels, members=members)


def _diff(run: Run, base: Run) -> str:
    if run.members:  # its config.yaml is its first member's: the members are the difference
        return "exp ensemble " + " ".join(run.members) + " --calibrate bias" * run.calibrated
    keys = sorted(set(run.config) | set(base.config))
    parts = [f"{k}={run.config.get(k)}" for k in keys if run.config.get(k) != base.config.get(k)]
    return ", ".join(parts) or "(same config)"


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "significant improvement"
    if hi < 0:
        return "significant regression"
    return "no significant difference (CI includes 0)"


def _num(v: object) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _compare(run: Run, base: Run, metric: str) -> dict:
    shared = base.oof[["id", "label", "fold", "pred"]].merge(
        run.oof[["id", "fold", "pred"]], on="id", suffixes=("_a", "_b")
    )
    if shared.empty:
        raise ReportError(f"runs {base.name} and {run.name} share no OOF ids: are they on the same data?")
    y, pa, pb = shared["label"], shared["pred_a"], shared["pred_b"]
    delta, lo, hi = paired_bootstrap(y, pa, pb, base.labels, metric)
    b, c, stat, p = mcnemar(y, pa, pb)
    same_folds = bool((shared["fold_a"] == shared["fold_b"]).all())
    fa, fb = base.cv.get("folds", []), run.cv.get("folds", [])
    fold_delta = [y - x for x, y in zip(fa, fb, strict=False)] if same_folds and len(fa) == len(fb) else None
    return dict(n=len(shared), delta=delta, lo=lo, hi=hi, b=b, c=c, stat=stat, p=p, fold_delta=fold_delta)


def write_report(run_dirs: list[Path], baseline: Path | None, out: Path, calibrated: bool = True) -> Path:
    """Markdown report + PNG plots comparing each run with the baseline (default: the first run).

    `out` is a folder (report.md goes inside) or a .md path (plots go beside it). Returns the .md path.
    `calibrated`: a bias-calibrated run is compared on its calibrated OOF (what it submits); False: raw.
    """
    if not run_dirs:
        raise ReportError("no run folders given")
    dirs = [Path(d) for d in run_dirs]
    base_dir = Path(baseline) if baseline else dirs[0]
    if base_dir.resolve() not in [d.resolve() for d in dirs]:
        dirs.insert(0, base_dir)
    runs = [load_run(d, calibrated) for d in dirs]
    base = next(r for r, d in zip(runs, dirs, strict=True) if d.resolve() == base_dir.resolve())
    metric = base.cv.get("metric", "macro_f1")
    out = Path(out)
    md_path = out if out.suffix == ".md" else out / "report.md"
    fig_dir = md_path.parent
    fig_dir.mkdir(parents=True, exist_ok=True)

    lines = [
        f"# Ablation report: baseline `{base.name}`",
        "",
        f"Metric: **{metric}**. CV = mean ± std over folds; Δ and its 95% CI are on the pooled OOF "
        "predictions of the ids both runs scored (paired bootstrap, 2000 resamples). McNemar: "
        "b = baseline right & run wrong, c = the reverse; exact binomial test if b+c < 25, else chi-square "
        "with continuity correction. The verdict follows the CI.",
        "",
        "| run | config vs baseline | CV mean ± std | accuracy | macro_f1 | Δ (95% CI) "
        "| McNemar b/c, p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if any(r.calibrated for r in runs):
        lines[4:4] = [
            "Runs marked *(calibrated)* are compared on their cross-fitted bias-calibrated OOF table "
            "(oof_calibrated.csv), the predictions their submission uses; `exp report --raw` compares the "
            "raw argmax tables instead.",
            "",
        ]
    comps, fold_lines = {}, []
    for run in runs:
        cv = f"{_num(run.cv.get('mean'))} ± {_num(run.cv.get('std'))}"
        name = f"`{run.name}`" + " *(calibrated)*" * run.calibrated
        head = f"| {name} | {_diff(run, base) if run is not base else 'baseline'} | {cv} | "
        head += f"{_num(run.cv.get('accuracy'))} | {_num(run.cv.get('macro_f1'))} | "
        if run is base:
            lines.append(head + "— | — | baseline |")
            continue
        c = comps[run.name] = _compare(run, base, metric)
        lines.append(
            head + f"{c['delta']:+.4f} ({c['lo']:+.4f}, {c['hi']:+.4f}), n={c['n']} | "
            f"{c['b']}/{c['c']}, p={c['p']:.3g} | {_verdict(c['lo'], c['hi'])} |"
        )
        deltas = c["fold_delta"]
        cells = " ".join(f"{d:+.4f}" for d in deltas) if deltas is not None else "n/a (folds differ)"
        fold_lines.append(f"- `{run.name}`: {cells}")
    if fold_lines:
        lines += ["", "## Per-fold delta vs baseline (fold 0, 1, ...)", "", *fold_lines]
    lines += ["", "## Plots", ""]
    ticks, legend = plots.tick_names(base.labels)
    if legend:
        lines += ["Classes are numbered in the plots (no installed font draws their names):", ""]
        lines += [f"- {i} = {label}" for i, label in legend.items()] + [""]
    for run in runs:
        png = fig_dir / f"confusion-{run.name}.png"
        plots.plot_confusion(run.name, run.oof, base.labels, ticks, png)
        lines.append(f"![confusion {run.name}]({png.name})")
        if run is not base:
            f1 = [
                metrics.per_class_report(r.oof["label"], r.oof["pred"], base.labels)["f1"].to_numpy()
                for r in (run, base)
            ]
            png = plots.plot_f1_change(
                f"{run.name} - {base.name}: per-class F1",
                f1[0] - f1[1],
                ticks,
                fig_dir / f"f1-change-{run.name}.png",
            )
            lines.append(f"![per-class F1 change {run.name}]({png.name})")
    text = "\n".join(lines) + "\n"
    _drop_stale_plots(md_path, text)
    return write_text(text, md_path)


_PLOT_LINK = re.compile(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)")


def _drop_stale_plots(md_path: Path, new_text: str) -> None:
    """Delete the plots the report at `md_path` linked before and the new one does not: a folder that
    compared runs a, b and then a, c would otherwise keep `confusion-b.png` beside a report that never
    names it. Only files the old report linked by name are touched, never other files in the folder."""
    if not md_path.is_file():
        return
    old = set(_PLOT_LINK.findall(md_path.read_text(encoding="utf-8", errors="replace")))
    for name in old - set(_PLOT_LINK.findall(new_text)):
        (md_path.parent / name).unlink(missing_ok=True)
