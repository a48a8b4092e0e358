"""`exp ensemble RUN_A RUN_B ...`: finished runs voted together into one new run folder.

The new folder holds the mean of the runs' test probabilities (`test_probs.csv`), the mean of their
OOF probabilities (`oof.csv`, same ids required) scored as its CV (`cv.json`), and a submission.
Each OOF row's probabilities still come from models that never saw that row, so the CV stays
out-of-fold even when the runs used different fold assignments (per-fold scores then follow the
first run's folds). With `calibrate="bias"` the mean is calibrated as `ensemble.calibrate=bias` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vlmexp import leaderboard
from vlmexp.config import Config, ConfigError
from vlmexp.kfold.calibrate import calibrate_run
from vlmexp.kfold.calibrate import summary as calibration_summary
from vlmexp.metrics import cv_summary, score
from vlmexp.rundir import RunDir, check_run_name, git_state
from vlmexp.submit import make_submission
from vlmexp.tables import PROB_PREFIX, prob_columns, probs, read_table, write_json, write_table

log = logging.getLogger(__name__)


class EnsembleError(ConfigError):
    """The runs named cannot be voted together (an argument error, so the CLI prints it as one line);
    the message says which run differs and how."""


def _labels(table: pd.DataFrame) -> list[str]:
    return [c[len(PROB_PREFIX) :] for c in table.columns if c.startswith(PROB_PREFIX)]


def _aligned(tables: list[pd.DataFrame], names: list[str], what: str) -> list[pd.DataFrame]:
    """The tables indexed by id, in the first table's order; refused unless every one has the same ids."""
    first = tables[0].set_index(tables[0]["id"].astype(str))
    out = [first]
    for name, t in zip(names[1:], tables[1:], strict=True):
        t = t.set_index(t["id"].astype(str))
        if t.index.has_duplicates or set(t.index) != set(first.index):
            only_a = sorted(set(first.index) - set(t.index))[:3]
            only_b = sorted(set(t.index) - set(first.index))[:3]
            raise EnsembleError(
                f"{what} of {name} covers other ids than {names[0]} (only in {names[0]}: {only_a}, only in "
                f"{name}: {only_b}); ensembles need runs on the same data (same data.dir, data.limit)"
            )
        out.append(t.loc[first.index])
    return out


def _mean(tables: list[pd.DataFrame], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    p = np.nanmean(np.stack([probs(t, labels) for t in tables]), axis=0)
    pred = np.array(labels, dtype=object)[np.argmax(np.nan_to_num(p, nan=-1.0), axis=1)]
    return p, pred


def ensemble_runs(
    members: list[RunDir],
    out: RunDir,
    *,
    calibrate: str = "none",
    force: bool = False,
    leaderboard: Path | str | None = None,
) -> dict:
    """Write `out` (test_probs.csv, oof.csv, cv.json, submission.csv, members in provenance.json) and
    append its leaderboard row to `leaderboard` (the command's `leaderboard=`; default: the first
    member's). Returns its cv.json."""
    if calibrate not in ("none", "bias"):
        raise EnsembleError(f"calibrate={calibrate!r}; choose none or bias")
    if len(members) < 2 and calibrate == "none":
        raise EnsembleError("give two or more finished runs (or one with --calibrate bias)")
    names = [m.root.name for m in members]
    for m in members:
        if not m.finished:
            raise EnsembleError(f"run {m.root} has not finished (no cv.json); finish it first")
    check_run_name(out.root.name)
    if out.root.exists():
        if not force:
            raise FileExistsError(f"{out.root} exists; pass --force to replace it")
        if not out.is_run:
            raise EnsembleError(f"--force would delete {out.root}, which is not a vlmexp run folder")
        shutil.rmtree(out.root)
    cfg: Config = members[0].config()
    if leaderboard is not None:
        cfg = dataclasses.replace(cfg, leaderboard=str(leaderboard))
    metric = cfg.metric

    tests = [read_table(m.path("test_probs.csv")) for m in members]
    labels = _labels(tests[0])
    for name, t in zip(names, tests, strict=True):
        if _labels(t) != labels:
            raise EnsembleError(
                f"{name} has labels {_labels(t)[:5]}..., {names[0]} has {labels[:5]}...: ensembles need "
                "the same labels in the same order (the same labels.json)"
            )
    tests = _aligned(tests, names, "test_probs.csv")
    oofs = _aligned([read_table(m.path("oof.csv")) for m in members], names, "oof.csv")
    for name, t in zip(names[1:], oofs[1:], strict=True):
        differ = (t["label"].astype(str) != oofs[0]["label"].astype(str)).to_numpy()
        if differ.any():
            raise EnsembleError(
                f"oof.csv of {name} has other gold labels than {names[0]} for {int(differ.sum())} ids, e.g. "
                f"{list(t.index[differ][:3])}; were suspect labels relabelled in one run only?"
            )

    p_test, pred_test = _mean(tests, labels)
    test = pd.DataFrame({"id": tests[0].index.to_numpy(), "pred": pred_test})
    test[prob_columns(labels)] = p_test
    # Like a fold vote's `agree`: the share of runs whose own pred is the ensemble's (pseudo-labels use it).
    test["agree"] = np.mean([t["pred"].astype(str).to_numpy() == pred_test for t in tests], axis=0)
    p_oof, pred_oof = _mean(oofs, labels)
    first = oofs[0]
    oof = pd.DataFrame({"id": first.index.to_numpy(), "label": first["label"].to_numpy()})
    oof["fold"] = first["fold"].to_numpy()
    oof["pred"] = pred_oof
    oof[prob_columns(labels)] = p_oof
    oof = oof.reset_index(drop=True)

    same_folds = all((t["fold"] == oofs[0]["fold"]).all() for t in oofs[1:])
    member_cv = [m.cv() for m in members]
    cv = {
        **cv_summary(oof, labels, metric),
        "members": names,
        "members_cv": [c.get("mean") for c in member_cv],
        "same_folds": same_folds,  # False: per-fold scores follow the first run's folds
        "config_hash": _hash(members),
        "git_sha": git_state()["sha"],
    }
    if calibrate == "bias":
        test, calibrated, offsets = calibrate_run(oof, test, labels, metric)
        write_table(calibrated.oof, out.path("oof_calibrated.csv"))
        cv["calibrated"] = calibration_summary(calibrated, offsets, labels)

    out.root.mkdir(parents=True, exist_ok=True)
    # The first run's config tells `exp submit`, `exp report` and `exp serve` where the data is.
    shutil.copyfile(members[0].config_path, out.config_path)
    write_json(
        {
            "run": out.root.name,
            "config_hash": cv["config_hash"],
            "ensemble_of": [str(m.root) for m in members],
            "calibrate": calibrate,
            "git": git_state(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        out.provenance_path,
    )
    write_table(oof, out.path("oof.csv"))
    write_table(test, out.path("test_probs.csv"))
    sub = _submission(cfg, out, labels)
    test_scores = _test_scores(cfg, test, labels)
    if test_scores:
        write_json(test_scores, out.path("test_score.json"))
    write_json(cv, out.cv_path)
    _append_row(cfg, out, cv, names, calibrate, sub, test_scores)
    log.info("%s: CV %s %.4f ± %.4f (members %s)", out.root.name, metric, cv["mean"], cv["std"], names)
    return cv


def default_name(members: list[RunDir], calibrate: str = "none") -> str:
    """e.g. ens-1a2b3c4d: the same runs give the same folder."""
    return f"ens-{_hash(members, calibrate)}"


def _hash(members: list[RunDir], calibrate: str = "none") -> str:
    key = " ".join(sorted(m.root.resolve().name for m in members)) + f" calibrate={calibrate}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def _submission(cfg: Config, out: RunDir, labels: list[str]) -> Path:
    from vlmexp.data import load_competition

    test_ids = load_competition(cfg.data).test["id"].tolist()
    return make_submission(
        out.root, test_ids, labels, out=out.path("submission.csv"), force=True, id_col=cfg.data.id_col
    )


def _test_scores(cfg: Config, test: pd.DataFrame, labels: list[str]) -> dict:
    """Test accuracy and macro-F1 against data.answers_csv (e.g. the demo's hidden labels), if given."""
    if not cfg.data.answers_csv:
        return {}
    from vlmexp.data import read_answers

    truth = read_answers(cfg.data)
    truth = truth[truth.index.isin(test["id"])]  # a data.limit run predicted only part of the test set
    if truth.empty:
        return {}
    pred = test.set_index("id")["pred"].reindex(truth.index)
    return {f"test_{m}": round(score(truth, pred, labels)[m], 4) for m in ("accuracy", "macro_f1")}


def _append_row(
    cfg: Config, out: RunDir, cv: dict, names: list[str], calibrate: str, sub: Path, test_scores: dict
) -> None:
    row = {
        "run": out.root.name,
        "overrides": "ensemble of "
        + " + ".join(names)
        + (f" calibrate={calibrate}" if calibrate != "none" else ""),
        "config_hash": cv["config_hash"],
        "git_sha": cv["git_sha"][:10],
        "metric": cv["metric"],
        "cv_mean": round(cv["mean"], 4),
        "cv_std": round(cv["std"], 4),
        "fold_scores": " ".join(f"{s:.4f}" for s in cv["folds"]),
        "accuracy": round(cv["accuracy"], 4),
        "macro_f1": round(cv["macro_f1"], 4),
        **test_scores,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "submission": str(sub),
        "data": cfg.data.dir,
    }
    if "calibrated" in cv:
        row["cv_calibrated"] = round(cv["calibrated"]["mean"], 4)
        row["cv_calibrated_std"] = round(cv["calibrated"]["std"], 4)
    write_json(row, out.leaderboard_row_path)
    leaderboard.append(row, Path(cfg.leaderboard), unique=True)
