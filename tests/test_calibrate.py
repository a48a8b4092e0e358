"""Per-class bias calibration: it helps a rare class argmax never predicts, and its CV never sees the
fold it scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlmexp.kfold import calibrate
from vlmexp.metrics import score

LABELS = ["common", "other", "rare"]


def _oof(n_per_fold: int = 20, folds: int = 4, seed: int = 0) -> pd.DataFrame:
    """Per fold: 12 common, 6 other, 2 rare rows. The model ranks `rare` second on its own rows
    (p = 0.45/0.15/0.40), so argmax never says rare; common rows give rare only 0.2."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(folds):
        for i in range(n_per_fold):
            gold = "common" if i < 12 else "other" if i < 18 else "rare"
            jitter = rng.uniform(-0.02, 0.02)
            p = {
                "common": [0.7 + jitter, 0.1, 0.2 - jitter],
                "other": [0.1 + jitter / 4, 0.8, 0.1 - jitter / 4],
                "rare": [0.45 + jitter, 0.15, 0.40 - jitter],
            }[gold]
            rows.append({"id": f"f{k}r{i}", "label": gold, "fold": k, "p": p})
    df = pd.DataFrame(rows)
    for j, label in enumerate(LABELS):
        df[f"p:{label}"] = [p[j] for p in df["p"]]
    df["pred"] = [LABELS[int(np.argmax(p))] for p in df["p"]]
    return df.drop(columns="p")


def test_bias_raises_macro_f1_where_argmax_misses_a_rare_class():
    oof = _oof()
    raw = score(oof["label"], oof["pred"], LABELS)["macro_f1"]
    assert "rare" not in set(oof["pred"])  # the constructed failure of argmax
    cv = calibrate.cross_fit(oof, LABELS, "macro_f1")
    assert raw < 0.8 and cv.mean == pytest.approx(1.0)
    assert (cv.oof["pred"] == oof["label"]).all() and (cv.oof["pred_raw"] == oof["pred"]).all()
    b = calibrate.fit_bias(calibrate.probs(oof, LABELS), oof["label"].map(LABELS.index).to_numpy())
    assert b[2] - b[0] > 0  # rare moved up against common
    test = calibrate.apply_bias(oof, LABELS, b)
    assert np.allclose(test[[f"p:{c}" for c in LABELS]].sum(axis=1), 1.0)
    same = calibrate.apply_bias(oof.assign(**{"p:other": 0.0}), LABELS, np.zeros(3))
    assert (same["p:other"] == 0).all()  # zero offsets and zero probabilities change nothing
    np.testing.assert_allclose(same["p:rare"], oof["p:rare"] / (oof["p:common"] + oof["p:rare"]))


def test_bias_leaves_a_model_argmax_already_serves_alone():
    oof = _oof()
    oof.loc[oof["label"] == "rare", ["p:common", "p:rare"]] = [0.2, 0.65]
    oof["pred"] = [LABELS[i] for i in np.argmax(oof[[f"p:{c}" for c in LABELS]].to_numpy(), axis=1)]
    b = calibrate.fit_bias(calibrate.probs(oof, LABELS), oof["label"].map(LABELS.index).to_numpy())
    assert np.all(b == 0)


def test_calibration_never_sees_the_fold_it_scores(monkeypatch):
    oof = _oof()
    seen: list[set[float]] = []
    fit = calibrate.fit_bias

    def spy(p, y, metric="macro_f1"):
        seen.append({round(float(x), 9) for x in p[:, 0]})  # p(common) identifies a row (jitter)
        return fit(p, y, metric)

    monkeypatch.setattr(calibrate, "fit_bias", spy)
    calibrate.cross_fit(oof, LABELS, "macro_f1")
    assert len(seen) == 4
    for k, fitted_on in enumerate(seen):
        held = {round(float(x), 9) for x in oof.loc[oof["fold"] == k, "p:common"]}
        rest = {round(float(x), 9) for x in oof.loc[oof["fold"] != k, "p:common"]}
        assert not fitted_on & held and fitted_on == rest


def test_calibrated_cv_is_not_the_in_sample_fit():
    # Pure noise: offsets fitted in-sample chase it; the cross-fitted CV must come out below that fit.
    rng = np.random.default_rng(1)
    n = 200
    p = rng.dirichlet([1, 1, 1], size=n)
    oof = pd.DataFrame(
        {"id": [str(i) for i in range(n)], "label": rng.choice(LABELS, n), "fold": np.arange(n) % 5}
    )
    oof[[f"p:{c}" for c in LABELS]] = p
    oof["pred"] = [LABELS[i] for i in p.argmax(1)]
    y = oof["label"].map(LABELS.index).to_numpy()
    b = calibrate.fit_bias(p, y)
    in_sample = calibrate._score(y, np.argmax(np.log(p) + b, axis=1), 3, "macro_f1")
    assert calibrate.cross_fit(oof, LABELS).mean < in_sample


def test_unknown_oof_label_is_refused():
    oof = _oof()
    oof.loc[0, "label"] = "ghost"
    with pytest.raises(ValueError, match="ghost"):
        calibrate.cross_fit(oof, LABELS)


def test_fast_score_equals_sklearn_macro_f1():
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 4, 50), rng.integers(0, 3, 50)  # class 3 never predicted
    names = ["a", "b", "c", "d"]
    want = score([names[i] for i in y], [names[i] for i in pred], names)
    assert calibrate._score(y, pred, 4, "macro_f1") == pytest.approx(want["macro_f1"])
    assert calibrate._score(y, pred, 4, "accuracy") == pytest.approx(want["accuracy"])


def test_run_with_calibrate_bias_reports_both_cvs(tmp_path, finished_folds):
    # The recipe's finalize on hand-written one-hot fold tables (tests/conftest.py's finished_folds).
    from vlmexp.config import load_config
    from vlmexp.recipe import finalize
    from vlmexp.tables import read_json, read_table

    gold = ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    cfg = load_config(
        ["folds=2", "name=r", f"runs_dir={tmp_path / 'runs'}", f"leaderboard={tmp_path / 'lb.csv'}",
         "ensemble.calibrate=bias"]
    )  # fmt: skip
    exp = finished_folds(cfg, ["a", "b", "c"], gold, gold, ["a", "b"])
    finalize(exp, started=0.0)
    cv = read_json(exp.run.cv_path)
    assert cv["calibrated"]["mean"] == pytest.approx(cv["mean"])  # one-hot tables: nothing to shift
    assert set(cv["calibrated"]["offsets"]) == set(exp.labels)
    assert {"pred_raw", "pred"} <= set(read_table(exp.run.path("test_probs.csv")).columns)
    assert len(read_table(exp.run.path("oof_calibrated.csv"))) == len(gold)
    lb = pd.read_csv(exp.cfg.leaderboard)
    assert lb.loc[0, "cv_calibrated"] == pytest.approx(round(cv["calibrated"]["mean"], 4))


def test_agree_is_recounted_for_a_calibrated_pred():
    table = pd.DataFrame(
        {"id": ["t1"], "pred": ["common"], "p:common": [0.45], "p:other": [0.15], "p:rare": [0.40]}
    )
    table["agree"], table["votes"] = 1.0, "common:3"
    out = calibrate.apply_bias(table, LABELS, np.array([0.0, 0.0, 0.5]))
    assert out.loc[0, "pred"] == "rare" and out.loc[0, "agree"] == 0.0
    table["votes"] = "common:2|rare:1"
    out = calibrate.apply_bias(table, LABELS, np.array([0.0, 0.0, 0.5]))
    assert out.loc[0, "agree"] == pytest.approx(1 / 3)
