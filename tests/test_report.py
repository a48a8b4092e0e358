"""Paired bootstrap, McNemar, and the ablation report from fake run folders."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import accuracy_score, f1_score

from vlmexp.report import ReportError, mcnemar, paired_bootstrap, write_report

LABELS = ["a", "b", "c"]


def _preds(seed: int, n: int, acc_a: float, acc_b: float):
    rng = np.random.default_rng(seed)
    y = rng.choice(LABELS, size=n)
    wrong = {"a": "b", "b": "c", "c": "a"}
    pa = np.array([t if rng.random() < acc_a else wrong[t] for t in y], dtype=object)
    pb = np.array([t if rng.random() < acc_b else wrong[t] for t in y], dtype=object)
    return y, pa, pb


def _mcnemar_pair(b: int, c: int):
    """y, A, B with exactly b (A right, B wrong) and c (A wrong, B right) plus 5 both right."""
    y = ["a"] * (b + c + 5)
    pa = ["a"] * b + ["b"] * c + ["a"] * 5
    pb = ["b"] * b + ["a"] * c + ["a"] * 5
    return y, pa, pb


def test_mcnemar_exact_by_hand():
    b, c, stat, p = mcnemar(*_mcnemar_pair(10, 2))
    assert (b, c) == (10, 2)
    # two-sided exact: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert p == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    assert stat == 2


def test_mcnemar_chi_square_by_hand():
    b, c, stat, p = mcnemar(*_mcnemar_pair(30, 10))
    assert stat == pytest.approx((20 - 1) ** 2 / 40)
    # chi-square with 1 dof: sf(x) = erfc(sqrt(x / 2))
    assert p == pytest.approx(math.erfc(math.sqrt(stat / 2)))


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_matches_plain_reimplementation(metric):
    y, pa, pb = _preds(0, 120, 0.6, 0.8)
    pa[3] = None  # an unparsed prediction counts as wrong
    n_boot = 300
    delta, lo, hi = paired_bootstrap(y, pa, pb, LABELS, metric, n_boot=n_boot, seed=5)

    pa_s = np.array(["(none)" if v is None else v for v in pa])

    def m(t, p):
        if metric == "accuracy":
            return accuracy_score(t, p)
        return f1_score(t, p, labels=LABELS, average="macro", zero_division=0)

    idx = np.random.default_rng(5).integers(0, len(y), size=(n_boot, len(y)))
    deltas = [m(y[i], pb[i].astype(str)) - m(y[i], pa_s[i]) for i in idx]
    want_lo, want_hi = np.percentile(deltas, [2.5, 97.5])
    true_delta = m(y, pb.astype(str)) - m(y, pa_s)
    assert delta == pytest.approx(true_delta)
    assert (lo, hi) == pytest.approx((want_lo, want_hi))
    assert lo < true_delta < hi and lo > 0  # B is clearly better on 120 samples


def _fake_run(root, name: str, preds, y, folds, cfg: dict, metric: str = "macro_f1"):
    d = root / name
    d.mkdir()
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    oof = pd.DataFrame({"id": [f"s{i}" for i in range(len(y))], "label": y, "fold": folds, "pred": preds})
    for label in LABELS:
        oof[f"p:{label}"] = (oof["pred"] == label).astype(float)
    oof.to_csv(d / "oof.csv", index=False)
    per_fold = [
        float(f1_score(y[folds == k], preds[folds == k], labels=LABELS, average="macro")) for k in range(3)
    ]
    cv = {
        "metric": metric,
        "mean": float(np.mean(per_fold)),
        "std": float(np.std(per_fold)),
        "folds": per_fold,
        "accuracy": float(accuracy_score(y, preds)),
        "macro_f1": float(f1_score(y, preds, average="macro")),
    }
    (d / "cv.json").write_text(json.dumps(cv))
    return d


def test_report_writes_markdown_and_plots(tmp_path):
    y, pa, pb = _preds(1, 150, 0.55, 0.9)
    folds = np.arange(150) % 3
    base = _fake_run(tmp_path, "base", pa, y, folds, {"prompt": "baseline", "lora": {"r": 16}, "name": "x"})
    better = _fake_run(
        tmp_path, "better", pb, y, folds, {"prompt": "label_desc", "lora": {"r": 16}, "name": "y"}
    )
    same = _fake_run(tmp_path, "same", pa, y, folds, {"prompt": "baseline", "lora": {"r": 32}})
    out = write_report([base, better, same], None, tmp_path / "rep")
    md = out.read_text()
    assert out == tmp_path / "rep" / "report.md"
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| `")}
    assert "significant improvement" in rows["`better`"] and "prompt=label_desc" in rows["`better`"]
    assert "name=" not in rows["`better`"]  # naming keys are not config differences
    assert "no significant difference" in rows["`same`"] and "lora.r=32" in rows["`same`"]
    assert "0/0, p=1" in rows["`same`"]
    assert "Per-fold delta" in md
    for png in ["confusion-base.png", "confusion-better.png", "f1-change-better.png", "f1-change-same.png"]:
        path = tmp_path / "rep" / png
        assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"
        assert f"({png})" in md


def test_report_rewritten_in_its_folder_drops_only_its_own_stale_plots(tmp_path):
    y, pa, pb = _preds(4, 60, 0.55, 0.9)
    folds = np.arange(60) % 3
    base = _fake_run(tmp_path, "base", pa, y, folds, {"prompt": "baseline"})
    b = _fake_run(tmp_path, "b", pb, y, folds, {"prompt": "label_desc"})
    c = _fake_run(tmp_path, "c", pa, y, folds, {"prompt": "cot"})
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "mine.png").write_bytes(b"user file")  # not linked by a report: left alone
    write_report([base, b], None, rep)
    assert (rep / "confusion-b.png").exists()
    write_report([base, c], None, rep)
    left = {p.name for p in rep.glob("*.png")}
    assert left == {"mine.png", "confusion-base.png", "confusion-c.png", "f1-change-c.png"}


def test_report_refuses_unfinished_run(tmp_path):
    y, pa, _ = _preds(2, 30, 0.5, 0.5)
    base = _fake_run(tmp_path, "base", pa, y, np.arange(30) % 3, {"prompt": "baseline"})
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("prompt: cot\n")
    with pytest.raises(ReportError, match="half has no cv.json.*not finished"):
        write_report([base, unfinished], None, tmp_path / "rep")


def test_settings_that_do_not_change_results_are_not_differences(tmp_path):
    y, pa, _ = _preds(3, 30, 0.5, 0.5)
    folds = np.arange(30) % 3
    base = _fake_run(tmp_path, "base", pa, y, folds, {"prompt": "baseline", "gpus": 1})
    other = _fake_run(
        tmp_path,
        "other",
        pa,
        y,
        folds,
        {"prompt": "baseline", "gpus": 2, "leaderboard": "x.csv", "speed": {"compile": True}},
    )
    md = write_report([base, other], None, tmp_path / "rep").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| `other`"))
    assert "(same config)" in row, row


def test_cjk_labels_without_a_font_are_numbered_with_a_legend_and_a_warning(tmp_path, monkeypatch, caplog):
    import logging

    from vlmexp import plots

    monkeypatch.setattr(plots, "find_font", lambda chars: None)
    labels = ["优惠券", "退款页面", "b"]
    y = np.array(["优惠券", "退款页面", "b"] * 10, dtype=object)
    folds = np.arange(30) % 3
    monkeypatch.setattr(sys.modules[__name__], "LABELS", labels)  # _fake_run's probability columns
    base = _fake_run(tmp_path, "base", y, y, folds, {"prompt": "baseline"})
    seen = []
    real = plots.plot_confusion
    monkeypatch.setattr(plots, "plot_confusion", lambda *a: seen.append(a[3]) or real(*a))
    with caplog.at_level(logging.WARNING):
        md = write_report([base], None, tmp_path / "rep").read_text()
    assert seen == [["0", "1", "2"]]
    assert "- 0 = 优惠券" in md and "- 1 = 退款页面" in md
    assert "fonts-noto-cjk" in caplog.text and "fonts-wqy-microhei" in caplog.text


def test_latin_labels_are_drawn_as_they_are(tmp_path, caplog):
    from vlmexp import plots

    assert plots.tick_names(["cat", "dog"]) == (["cat", "dog"], {})
    assert caplog.text == ""


def test_a_calibrated_run_is_compared_on_the_table_it_submits(tmp_path):
    """ensemble.calibrate=bias submits calibrated predictions: the report compares oof_calibrated.csv
    (its CV from that table), and --raw (calibrated=False) the raw argmax table."""
    y, pa, pb = _preds(4, 150, 0.55, 0.9)
    folds = np.arange(150) % 3
    base = _fake_run(tmp_path, "base", pa, y, folds, {"prompt": "baseline"})
    cal = _fake_run(tmp_path, "cal", pa, y, folds, {"prompt": "baseline", "ensemble": {"calibrate": "bias"}})
    # raw OOF equals the baseline's; the calibrated table is the much better pb
    pd.read_csv(cal / "oof.csv").assign(pred=pb).to_csv(cal / "oof_calibrated.csv", index=False)
    cv = json.loads((cal / "cv.json").read_text())
    cv |= {"calibrated": {"mean": 0.9, "std": 0.0, "folds": []}, "members": ["base"]}  # as exp ensemble
    (cal / "cv.json").write_text(json.dumps(cv))

    rows = _rows(write_report([base, cal], None, tmp_path / "rep").read_text())
    assert "significant improvement" in rows["`cal` *(calibrated)*"]
    assert "exp ensemble base --calibrate bias" in rows["`cal` *(calibrated)*"]
    per_fold = [f1_score(y[folds == k], pb[folds == k], labels=LABELS, average="macro") for k in range(3)]
    want = np.mean(per_fold)
    assert f"{want:.4f}" in rows["`cal` *(calibrated)*"]

    raw = _rows(write_report([base, cal], None, tmp_path / "raw", calibrated=False).read_text())
    assert "0/0, p=1" in raw["`cal`"]

    (cal / "oof_calibrated.csv").unlink()
    with pytest.raises(ReportError, match="oof_calibrated.csv"):
        write_report([base, cal], None, tmp_path / "rep2")


def _rows(md: str) -> dict[str, str]:
    return {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| `")}
