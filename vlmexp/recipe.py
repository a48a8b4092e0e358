"""The experiment recipe: `exp run prompt=label_desc folds=5` reads top to bottom.

folds -> data -> (per fold: split -> balance -> model -> train -> predict OOF + test -> save)
-> score OOF -> vote on test -> reconcile -> suspects -> submission -> leaderboard.

Every fold's outputs land in `runs/<name>/folds/fold{k}/` before its `done.json`, so a rerun
skips finished folds and a killed run resumes at the fold it was in.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import socket
import time
from pathlib import Path

import pandas as pd

from vlmexp import leaderboard
from vlmexp.balance import UNDERSAMPLE_FLOOR, resample
from vlmexp.config import Config, ConfigError, config_hash, diff_from_defaults, run_name
from vlmexp.data import Competition, preflight, read_answers
from vlmexp.engine import heap, vision_prepass
from vlmexp.engine.predict import predict
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import ImageMemo, build_samples
from vlmexp.engine.train import FoldOutputs, train_fold
from vlmexp.engine.tta import predict_tta
from vlmexp.fingerprint import competition_fingerprint
from vlmexp.kfold.calibrate import calibrate_run
from vlmexp.kfold.calibrate import summary as calibration_summary
from vlmexp.kfold.ensemble import apply_suspects, disagreements, reconcile, suspect_labels, vote
from vlmexp.kfold.folds import assign_folds, check_oof_ids
from vlmexp.launch import FoldJob, fsdp, ray_tasks, torchrun
from vlmexp.metrics import confusion, cv_summary, level_scores, per_class_report, score
from vlmexp.models.base_once import BaseModel
from vlmexp.models.load import load_for_inference, load_processor
from vlmexp.progress import RunProgress
from vlmexp.prompts.render import load_template
from vlmexp.pseudolabel.select import add_pseudo, select_pseudo, split_with_pseudo
from vlmexp.rundir import RunDir, find_run
from vlmexp.sanity import describe, run_flags
from vlmexp.submit import make_submission
from vlmexp.tables import read_json, read_table, write_json, write_table
from vlmexp.timing import phase

log = logging.getLogger("vlmexp")


def run_experiment(cfg: Config, force: bool = False) -> RunDir:
    """Run (or resume) one experiment; with pseudo.rounds=N, chain N pseudo-label rounds after it."""
    return run_experiments([cfg], force=force)[0]


def run_experiments(cfgs: list[Config], force: bool = False) -> list[RunDir]:
    """Run (or resume) several experiments, e.g. a sweep's grid, each with its pseudo-label rounds.
    Round by round, the runs go to the launcher together: with launcher=ray every unfinished fold of
    every run is submitted at once (4 variants x 5 folds = 20 tasks); otherwise one run after another."""
    # Round 0 is the plain run: same hash as `exp run` without pseudo.rounds, so it is reused.
    base = [dataclasses.replace(c, pseudo=dataclasses.replace(c.pseudo, rounds=0)) for c in cfgs]
    runs = _run_all(base, force)
    for r in range(1, max(c.pseudo.rounds for c in cfgs) + 1):
        chained = [i for i, c in enumerate(cfgs) if c.pseudo.rounds >= r]
        pseudo = [dataclasses.replace(base[i].pseudo, source=str(runs[i].root), round=r) for i in chained]
        nxt = [
            dataclasses.replace(base[i], pseudo=p, name=f"{run_name(base[i])}-pl{r}" if base[i].name else "")
            for i, p in zip(chained, pseudo, strict=True)
        ]
        for i, run in zip(chained, _run_all(nxt, force), strict=True):
            runs[i] = run
    return runs


def _run_all(cfgs: list[Config], force: bool) -> list[RunDir]:
    if any(c.launcher == "ray" for c in cfgs):
        return run_on_ray(cfgs, force=force)
    return [run_once(c, force=force) for c in cfgs]


@dataclasses.dataclass
class Experiment:
    """Everything the folds share, prepared once: run folder, data, folds, prompt, OCR, test samples."""

    cfg: Config
    run: RunDir
    prov: dict
    comp: Competition
    train: pd.DataFrame  # original rows with their labels as given: validation and CV use these only
    # what folds train on: train (suspects relabelled or dropped) + pseudo-labelled test rows (`pseudo`)
    train_all: pd.DataFrame
    pseudo: pd.DataFrame
    folds: pd.Series  # id -> fold, shared by every run on this data
    template: object
    ocr: dict[str, str] | None
    processor: object
    test_samples: list[dict]
    # Encoded rows and frozen-tower image features, computed once and reused by every fold (speed.*).
    caches: RunCaches | None = None
    # The base weights, loaded at the first fold and shared by all (speed.reuse_base, models/base_once.py).
    base: BaseModel | None = None
    images: ImageMemo | None = None  # each image decoded once per run, shared by every fold's samples

    @property
    def labels(self) -> list[str]:
        return self.comp.labels

    def samples(self, df: pd.DataFrame, with_answer: bool) -> list[dict]:
        return build_samples(
            df,
            labels=self.labels,
            descriptions=self.comp.descriptions,
            template=self.template,
            cfg=self.cfg,
            ocr=self.ocr,
            with_answer=with_answer,
            tree=self.comp.tree,
            images=self.images,
        )


def run_once(cfg: Config, force: bool = False) -> RunDir:
    t0 = time.time()
    run = RunDir.for_config(cfg)  # refuses a name that is not one plain folder, before anything is touched
    if run.finished and not force:
        # A sweep or a pseudo-label chain meets finished runs again: reuse them, as they are, but only
        # the same config on the same data (a `name=` reused for other settings is refused).
        if run.is_run:
            run.same_run(cfg, competition_fingerprint(cfg.data))
        log.info("%s already finished (cv.json); reusing it (--force redoes it)", run.root.name)
        _post_leaderboard_row(run, cfg)
        return run
    fresh = not run.root.exists()
    try:
        return _run_folds(cfg, t0, force)
    except BaseException:
        # A run that dies before computing anything (e.g. data.dir mistyped) leaves no empty folder.
        if fresh and run.discard_if_empty():
            log.info("removed %s: the run failed before computing anything", run.root)
        raise


def _run_folds(cfg: Config, t0: float, force: bool) -> RunDir:
    """prepare -> every unfinished fold (here, or one process per GPU) -> finalize."""
    if cfg.launcher == "ray":
        return run_on_ray([cfg], force=force)[0]
    with phase("prepare"):
        exp = prepare(cfg, force=force)
    pending = [k for k in range(cfg.folds) if not exp.run.fold_done(k)]
    if cfg.gpus > 1 and pending:
        # One process per GPU of this machine through torchrun, each running its share of the fold units.
        torchrun.launch_folds(cfg, pending, run_fold_task, exp.run.path("launch_config.yaml"))
    elif cfg.train.gpus_per_fold > 1:
        # One fold after another, each sharded over train.gpus_per_fold processes (launch/fsdp.py).
        for k in pending:
            run_fold_task(cfg, k)
    else:
        with RunProgress(cfg.folds, title=exp.run.root.name) as progress:
            try:
                for k in range(cfg.folds):
                    if k in pending:
                        run_fold(exp, k, progress)
                    else:
                        progress.skip_fold(k)
            finally:
                heap.thaw()  # the folds froze the run's objects (speed.freeze_heap); a failed run's too
    with phase("finalize"):
        return finalize(exp, started=t0)


def prepare(cfg: Config, force: bool = False) -> Experiment:
    # -- setup: run folder, data, prompt -------------------------------------------
    template = load_template(cfg.prompt, cfg.prompts.dir)
    # Before fold 0 and before the run folder: every image decoded, every file the config names
    # (answers, mix dataset, OCR cache, source runs) checked, all problems listed in one DataError.
    comp = preflight(cfg)
    # Content, not the data.dir path: a resume on an edited train.csv is refused, saying what changed.
    fingerprint = competition_fingerprint(cfg.data)
    run = RunDir.for_config(cfg)
    prov = run.start(cfg, template.sources, force=force, fingerprint=fingerprint)
    train = comp.train

    # -- folds: computed once per dataset/k/seed and shared by every run ------------
    store = Path(cfg.runs_dir) / "_folds"
    folds = assign_folds(train, cfg.folds, cfg.fold_seed, store_dir=store, fingerprint=fingerprint)
    # A source run's suspect labels change what the folds train on, never what they are scored on:
    # validation rows keep their labels as given (run_fold), so the CV stays comparable with other runs.
    fit = _apply_source_suspects(train, cfg) if cfg.ensemble.suspects != "keep" else train

    # -- pseudo-labels: confident, agreeing test predictions of a finished run ------
    pseudo = pd.DataFrame()
    if cfg.pseudo.source:
        src = find_run(cfg.pseudo.source, cfg.runs_dir).root
        test_probs = read_table(src / "test_probs.csv")
        pseudo = select_pseudo(test_probs, comp.labels, cfg.pseudo.min_agree, cfg.pseudo.min_confidence)
        log.info("pseudo-labels from %s: %d of %d test rows", src.name, len(pseudo), len(comp.test))
        write_table(pseudo, run.path("pseudo_labels.csv"))
    train_all = add_pseudo(fit, comp.test, pseudo)

    # -- OCR text, read once per image and cached by content hash -------------------
    ocr = _ocr_texts(cfg, comp)
    exp = Experiment(
        cfg=cfg,
        run=run,
        prov=prov,
        comp=comp,
        train=train,
        train_all=train_all,
        pseudo=pseudo,
        folds=folds,
        template=template,
        ocr=ocr,
        processor=load_processor(cfg),
        test_samples=[],
        images=ImageMemo(cfg),
    )
    exp.test_samples = exp.samples(comp.test, with_answer=False)
    exp.caches = RunCaches.for_run(cfg, exp.processor)
    return exp


def run_fold(exp: Experiment, k: int, progress: RunProgress | None = None) -> None:
    """Split -> balance -> train -> predict OOF and test -> save; done.json is written last."""
    cfg, labels, fdir = exp.cfg, exp.labels, exp.run.fold_dir(k)
    if progress:
        progress.start_fold(k)
    train_split, _ = split_with_pseudo(exp.train_all, exp.folds, k)
    _, val_split = split_with_pseudo(exp.train, exp.folds, k)  # scored on the labels as given
    train_split, before, after = resample(train_split, cfg.balance, seed=cfg.seed + k)
    if cfg.balance != "none" and before == after:
        log.warning(
            "fold %d: balance=%s changed no class count (undersample never cuts a class below %d rows, "
            "and the others never shrink one); the split trains as it is",
            k,
            cfg.balance,
            UNDERSAMPLE_FLOOR,
        )
    n_pseudo = int(train_split["pseudo"].sum())
    write_json({"before": before, "after": after, "pseudo_rows": n_pseudo}, fdir / "class_counts.json")

    # Full GC passes skip what lives for the whole run (imports, data, caches): 2.6 -> 0.5 s of GC on
    # a 10 s CPU run (engine/heap.py). Before the fold's model loads, so the model stays collectable.
    heap.fold_start(cfg.speed.freeze_heap)
    # peft draws the LoRA init from the global RNG: seeded per fold so a resumed fold equals the original.
    exp.base = exp.base or BaseModel(cfg)
    with phase("load_model"):
        model = exp.base.for_training(seed=cfg.seed + k)
    train_samples, val_samples = exp.samples(train_split, True), exp.samples(val_split, False)
    # speed.vision_prepass: the frozen tower over every image first (fold 0 computes them, later folds none)
    vision_prepass.prepass_fold(exp, model, train_samples, val_samples, progress)
    result = train_fold(
        cfg,
        model,
        exp.processor,
        train_samples,
        val_samples,
        labels,
        FoldOutputs.for_fold(exp.run, k),
        on_log=progress.on_log if progress else None,
        caches=exp.caches,
    )
    trained = model if exp.base.shared else None  # else freed before the prediction model loads
    del model, train_samples
    _free_memory(keep_cache=exp.base.shared)
    if not fsdp.is_main_process():
        return  # a sharded fold's other ranks only train; rank 0 predicts and writes the fold's files

    with phase("load_model"):
        # the trained model itself when the base is shared, else a fresh load of base + saved adapter
        local = cfg.predict.backend == "local"
        model = exp.base.for_prediction(trained, result.adapter_dir) if local else None
    del trained
    with phase("predict_oof"):
        if _validation_is_oof(cfg, result):
            oof = result.val_table.copy()
        else:
            val_samples = exp.samples(val_split, False)
            oof = _predict(cfg, model, exp.processor, val_samples, labels, exp.caches, (exp.run, k))
    oof.insert(1, "label", val_split["label"].to_numpy())
    oof.insert(2, "fold", k)
    with phase("predict_test"):
        test_k = _predict(cfg, model, exp.processor, exp.test_samples, labels, exp.caches, (exp.run, k))
    exp.base.release(model)
    del model
    _free_memory(keep_cache=exp.base.shared)

    write_table(oof, fdir / "oof.csv")
    write_table(test_k, fdir / "test.csv")
    metrics = score(oof["label"], oof["pred"], labels)
    write_json(
        {
            **metrics,
            "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds,
            "train_rows": len(train_split),
            "batch_size": result.batch_size,  # as trained: train.batch_size=auto resolved, e.g. 24
            "lr": result.lr,
            # Training loss per logging step, e.g. [2.91, 2.40, ...]: compares sharded and single folds.
            "train_losses": [round(e["loss"], 6) for e in result.log_history if "loss" in e],
        },
        fdir / "metrics.json",
    )
    exp.run.mark_fold_done(k, {"fold": k, cfg.metric: metrics[cfg.metric]})
    if progress:
        progress.end_fold(k, metrics[cfg.metric])


def run_on_ray(cfgs: list[Config], force: bool = False) -> list[RunDir]:
    """launcher=ray: prepare every run folder here, send every unfinished fold of every run to the
    cluster as one task each, and finalize each run (CV, vote, submission, leaderboard row) as soon
    as its own folds are in."""
    t0 = time.time()
    runs, exps, jobs = [], {}, []
    for cfg in cfgs:
        run = RunDir.for_config(cfg)
        if run.root.name in exps:  # the same run twice in a grid
            runs.append(run)
            continue
        if run.finished and not force:
            runs.append(run_once(cfg, force=False))  # reused as it is, like a local run
            continue
        exp = prepare(cfg, force=force)
        # The driver only scores and votes: the models, samples and caches live in the fold tasks.
        exp.test_samples, exp.caches = [], None
        exps[run.root.name] = exp
        jobs += [FoldJob(run.root.name, cfg, k) for k in range(cfg.folds) if not run.fold_done(k)]
        runs.append(run)
    ray_tasks.run_folds(
        jobs, list(exps), run_fold_task, lambda name: finalize(exps.pop(name), started=t0), cfgs[0].ray
    )
    return runs


# The run this process prepared last, reused by its next fold of the same run (a torchrun rank's folds,
# a Ray worker's next task): one entry, so a long sweep holds one run's caches at a time.
_PREPARED: dict[str, Experiment] = {}


def run_fold_task(cfg: Config, k: int) -> dict:
    """The unit of work every launcher schedules: fold k of the run `cfg` names, in whatever process
    runs it (this one, a torchrun rank, a Ray worker on another node). The driver's `prepare` made the
    run folder; a process that cannot see it fails here instead of training into a folder of its own."""
    run = RunDir.for_config(cfg)
    where = f"node {socket.gethostname()}"
    provenance = run.path("provenance.json")
    if not provenance.exists():
        raise FileNotFoundError(
            f"{where} cannot see the run folder {run.root.resolve()} (no provenance.json): "
            f"runs_dir={cfg.runs_dir} must be storage every node mounts at the same path, e.g. NFS; "
            "see docs/scaling.md"
        )
    have = read_json(provenance).get("config_hash")
    if have != config_hash(cfg):
        raise ConfigError(f"{where}: {run.root} holds config {have}, the task's config is {config_hash(cfg)}")
    if not run.fold_done(k):
        task = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        if fsdp.is_main_process():
            write_json(task, run.fold_task_path(k))
        if cfg.train.gpus_per_fold > 1 and not fsdp.in_sharded_fold():
            # This process hands the fold to gpus_per_fold processes that train it together.
            fsdp.launch_fold(cfg, k, run_fold_task, run.path(f"launch_config_fold{k}.yaml"))
            return {"run": run.root.name, "fold": k}
        key = f"{run.root.resolve()}:{config_hash(cfg)}"
        if key not in _PREPARED:
            _PREPARED.clear()
            heap.thaw()  # the last run's frozen objects (its base weights) become collectable
            _PREPARED[key] = prepare(cfg)
        run_fold(_PREPARED[key], k)
    return {"run": run.root.name, "fold": k}


def finalize(exp: Experiment, started: float) -> RunDir:
    cfg, run, labels = exp.cfg, exp.run, exp.labels
    missing = [k for k in range(cfg.folds) if not run.fold_done(k)]
    if missing:
        raise RuntimeError(
            f"folds {missing} of {run.root} did not finish; rerun the same command to resume them"
        )

    # -- score: out-of-fold CV on the original labels only --------------------------
    oof = pd.concat([read_table(run.fold_dir(k) / "oof.csv") for k in range(cfg.folds)], ignore_index=True)
    check_oof_ids(oof["id"], exp.train["id"].tolist())  # each training id once: else it is no CV
    write_table(oof, run.path("oof.csv"))
    cv = {
        **cv_summary(oof, labels, cfg.metric),
        "config_hash": config_hash(cfg),
        "git_sha": exp.prov["git"]["sha"],
    }
    fold_scores = cv["folds"]
    if exp.comp.tree:
        # Two-level labels: the parents' scores beside the full paths', e.g. level1 macro_f1 0.95 vs 0.81.
        cv["levels"] = level_scores(oof["label"], oof["pred"], exp.comp.tree)
    # The floor every run must clear: always answering the most common training label.
    majority = exp.train["label"].value_counts().idxmax()
    majority_key = f"majority_{cfg.metric}"
    cv[majority_key] = score(oof["label"], [majority] * len(oof), labels)[cfg.metric]
    flags = run_flags(cv["mean"], cv["std"], cv[majority_key], oof["pred"].tolist())
    cv["flag"] = " ".join(flags)
    if flags:
        log.warning(
            "%s: %s", run.root.name, describe(flags, cfg.metric, cv["mean"], cv["std"], cv[majority_key])
        )
    write_table(
        per_class_report(oof["label"], oof["pred"], labels).reset_index(names="label"),
        run.path("per_class.csv"),
    )
    write_table(
        confusion(oof["label"], oof["pred"], labels).reset_index(names="label"), run.path("confusion.csv")
    )

    # -- vote: fold models on the test set, disputed rows reconciled ------------------
    fold_tests = [read_table(run.fold_dir(k) / "test.csv") for k in range(cfg.folds)]
    ensemble = vote(fold_tests, labels, how=cfg.ensemble.vote)
    write_table(disagreements(fold_tests, labels), run.path("disagreements.csv"))
    rerun = None
    if cfg.ensemble.reconcile == "rerun":
        rerun = read_table(find_run(cfg.ensemble.rerun_from, cfg.runs_dir).path("test_probs.csv"))
    final = reconcile(ensemble, fold_tests, labels, reconcile_policy(cfg), rerun_table=rerun)
    if cfg.ensemble.calibrate == "bias":
        # Per-class offsets fitted on the OOF rows shift the test ensemble; the CV beside the raw one
        # is cross-fitted (each fold scored by offsets fitted on the others), so it stays honest.
        final, calibrated, offsets = calibrate_run(oof, final, labels, cfg.metric)
        write_table(calibrated.oof, run.path("oof_calibrated.csv"))
        cv["calibrated"] = calibration_summary(calibrated, offsets, labels)
    write_table(final, run.path("test_probs.csv"))
    write_table(suspect_labels(oof, labels, cfg.ensemble.suspect_confidence), run.path("suspect_labels.csv"))

    # -- save: submission, the leaderboard row, cv.json (it marks the run finished), the append ------
    # data.limit=60 predicts the first 60 of 200 test rows: no submission.csv that looks submittable.
    test_rows = (exp.prov.get("data_fingerprint") or {}).get("files", {}).get(cfg.data.test_csv, {})
    cut = bool(cfg.data.limit) and test_rows.get("rows") not in (None, len(exp.comp.test))
    if cut:
        sub = ""
        log.warning(
            "no submission.csv: data.limit=%d predicted %d of %s test rows; data.train_limit=%d cuts only "
            "the training rows, for a quick run that can be submitted",
            cfg.data.limit,
            len(exp.comp.test),
            test_rows["rows"],
            cfg.data.limit,
        )
        run.path("submission.csv").unlink(missing_ok=True)
    else:
        sub = make_submission(
            run.root,
            exp.comp.test["id"].tolist(),
            labels,
            out=run.path("submission.csv"),
            force=True,
            id_col=cfg.data.id_col,
        )
    test_scores = _score_answers(cfg, exp, final, majority)
    cv["duration_s"] = round(time.time() - started, 1)
    row = {
        "run": run.root.name,
        "overrides": " ".join(f"{k}={v}" for k, v in diff_from_defaults(cfg).items()),
        "config_hash": cv["config_hash"],
        "git_sha": cv["git_sha"][:10],
        "metric": cfg.metric,
        "cv_mean": round(cv["mean"], 4),
        "cv_std": round(cv["std"], 4),
        "fold_scores": " ".join(f"{s:.4f}" for s in fold_scores),
        "flag": cv["flag"],
        "accuracy": round(cv["accuracy"], 4),
        "macro_f1": round(cv["macro_f1"], 4),
        majority_key: round(cv[majority_key], 4),
        **test_scores,
        "train_size": len(exp.train),
        "pseudo_round": cfg.pseudo.round,
        "pseudo_count": len(exp.pseudo),
        "duration_s": cv["duration_s"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "submission": str(sub),
        "data": cfg.data.dir,
        # fingerprint.competition_fingerprint's digest: the same folder name with other contents tells apart.
        "data_fingerprint": (exp.prov.get("data_fingerprint") or {}).get("digest", ""),
    }
    for level, scores in cv.get("levels", {}).items():  # columns level1_accuracy ... level2_macro_f1
        row |= {f"{level}_{k}": round(v, 4) for k, v in scores.items()}
    if "calibrated" in cv:
        row["cv_calibrated"] = round(cv["calibrated"]["mean"], 4)
        row["cv_calibrated_std"] = round(cv["calibrated"]["std"], 4)
    # The row is saved before cv.json: a run killed between cv.json and the append (e.g. waiting
    # on the leaderboard lock) gets its row appended by the rerun that finds it finished.
    write_json(row, run.leaderboard_row_path)
    write_json(cv, run.cv_path)
    _post_leaderboard_row(run, cfg)
    log.info("%s: CV %s %.4f ± %.4f", run.root.name, cfg.metric, cv["mean"], cv["std"])
    return run


def _predict(
    cfg: Config,
    model,
    processor,
    samples: list[dict],
    labels: list[str],
    caches=None,
    fold: tuple[RunDir, int] | None = None,
) -> pd.DataFrame:
    """Local scoring or generation, or an OpenAI-compatible server (backend=openai, e.g. `vllm serve`)
    asking fold k's own model (`fold`=(run, k)) for fold k's out-of-fold and test rows."""
    if cfg.predict.tta != "none":
        # Each view of the images goes through this same function without TTA; probabilities averaged.
        plain = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, tta="none"))

        def one_view(view_samples: list[dict]) -> pd.DataFrame:
            return _predict(plain, model, processor, view_samples, labels, caches, fold)

        return predict_tta(samples, labels, cfg.predict.tta, one_view)
    if cfg.predict.backend == "openai":
        from vlmexp.engine.openai_backend import predict_fold_openai

        if fold is None:  # one model for every fold's rows would make the CV in-fold
            raise ValueError("predict.backend=openai predicts one fold's rows at a time: pass fold=(run, k)")
        run, k = fold
        return predict_fold_openai(cfg, samples, labels, run_name=run.root.name, k=k,
                                   adapter_dir=run.adapter_dir(k), concurrency=cfg.predict.concurrency,
                                   progress=False)  # fmt: skip
    return predict(cfg, model, processor, samples, labels, progress=False, caches=caches)


def _validation_is_oof(cfg: Config, result) -> bool:
    """Whether the kept weights' validation table is the OOF table `_predict` would compute: the same
    rows, weights and `predict` call (a 400-row demo fold skips 80 predictions: 13 s of a 3B run's
    276). Not with TTA or an OpenAI-compatible server, which predict OOF rows another way, and not when
    the kept evaluation ran in an earlier, killed process (no table in memory)."""
    local_plain = cfg.predict.backend == "local" and cfg.predict.tta == "none"
    return local_plain and result.val_table is not None


def predict_test_with(cfg: Config, run: RunDir, adapter_dir: Path) -> pd.DataFrame:
    """The test set as one adapter predicts it, with the run's prompt, OCR and TTA (e.g. the folds'
    averaged adapter of `exp export --average-folds --score`)."""
    # The run's own folder, wherever the command runs from (config.yaml may hold runs_dir=runs).
    cfg = dataclasses.replace(cfg, runs_dir=str(run.root.parent), name=run.root.name)
    exp = prepare(cfg)
    model = load_for_inference(cfg, adapter_dir)
    return _predict(cfg, model, exp.processor, exp.test_samples, exp.labels, exp.caches)


def _score_answers(cfg: Config, exp: Experiment, final: pd.DataFrame, majority: str) -> dict:
    """Score the test ensemble against known answers (data.answers_csv), e.g. the demo's hidden labels."""
    if not cfg.data.answers_csv:
        return {}
    path = Path(cfg.data.dir) / cfg.data.answers_csv
    truth = read_answers(cfg.data)  # plain strings: an answer "None" or "NA" is a label, not missing
    predicted = truth.index.isin(final["id"])
    if not predicted.all():  # e.g. data.limit=50 predicted 50 of 200 answered test rows: score those only
        n, total = int(predicted.sum()), len(truth)
        log.warning("%s: scoring the %d of %d answers whose rows this run predicted", path, n, total)
        truth = truth[predicted]
    if truth.empty:
        return {}
    pred = final.set_index("id")["pred"].reindex(truth.index)
    result = {f"test_{m}": round(score(truth, pred, exp.labels)[m], 4) for m in ("accuracy", "macro_f1")}
    result[f"test_majority_{cfg.metric}"] = round(
        score(truth, [majority] * len(truth), exp.labels)[cfg.metric], 4
    )
    write_json(result | {"test_rows": len(truth)}, exp.run.path("test_score.json"))
    log.info(
        "test answers %s: accuracy %.4f, macro-F1 %.4f",
        path,
        result["test_accuracy"],
        result["test_macro_f1"],
    )
    return result


def _ocr_texts(cfg: Config, comp: Competition) -> dict[str, str] | None:
    if not cfg.ocr.enabled:
        return None
    from vlmexp.ocr import ocr_text_for

    return ocr_text_for(comp.train["image"].tolist() + comp.test["image"].tolist(), cfg.ocr)


def reconcile_policy(cfg: Config) -> str:
    """The policy for the rows the folds disagree on. The default (soft) follows ensemble.vote=majority:
    under soft it re-decided every disputed row by the mean probabilities, so vote=majority changed
    nothing (2 folds voting A at 0.4 against one voting B at 0.95 came out B)."""
    if cfg.ensemble.reconcile == "soft" and cfg.ensemble.vote == "majority":
        return "majority"
    return cfg.ensemble.reconcile


def _apply_source_suspects(train: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    src = find_run(cfg.ensemble.suspects_from, cfg.runs_dir).root
    suspects = read_table(src / "suspect_labels.csv")
    hit = suspects["id"].astype(str).isin(train["id"].astype(str))
    share = int(hit.sum()) / max(len(train), 1)
    log.info("%s %d suspect labels from %s", cfg.ensemble.suspects, len(suspects), src.name)
    if share > 0.2:  # a source run that learned little calls most labels suspect (e.g. 56 of 60)
        log.warning(
            "%s calls %.0f%% of the training labels suspect; %s them only if that run is good (its CV, "
            "`exp leaderboard`): a run that answers one class flags every other class's rows",
            src.name,
            100 * share,
            cfg.ensemble.suspects,
        )
    return apply_suspects(train, suspects, how=cfg.ensemble.suspects)


def _post_leaderboard_row(run: RunDir, cfg: Config) -> None:
    """Append the finished run's row to cfg.leaderboard unless it is there already (same run and hash)."""
    if not run.leaderboard_row_path.exists():  # a run finished before rows were kept in the folder
        return
    if leaderboard.append(read_json(run.leaderboard_row_path), Path(cfg.leaderboard), unique=True):
        log.info("%s: row added to %s", run.root.name, cfg.leaderboard)


def _free_memory(keep_cache: bool = False) -> None:
    """Collect the fold's garbage; give torch's cached GPU memory back to the driver unless `keep_cache`.
    A run on one shared base (speed.reuse_base) keeps it: the next fold allocates the same activation
    blocks again, and emptying the cache made it ask the driver for them anew (cudaMalloc, which
    synchronises). Free-memory decisions count the cache as free (`memory.free_gpu_bytes`)."""
    gc.collect()
    if keep_cache:
        return
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
