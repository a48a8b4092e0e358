"""`exp` commands that read finished runs: report, leaderboard, submit, export, serve, ensemble.

Each takes the same `key=value` settings as `exp run` (runs_dir=..., leaderboard=..., data.dir=...)
and names a run by its folder, from anywhere, or by its name under runs_dir.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from vlmexp.cli_common import (
    OVERRIDES,
    ConfigError,
    _find,
    _print_cv,
    _settings,
    _setup_logging,
    _split_args,
    app,
    console,
    load_config,
    user_errors,
)


@app.command()
@user_errors
def report(
    runs: list[str] = typer.Argument(..., help="run folders or names, plus key=value such as runs_dir=DIR"),
    baseline: str = typer.Option(None, "--baseline", help="run to compare against; default the first"),
    out: Path = typer.Option(None, "--out", help="report folder; default <runs_dir>/_reports/<runs>"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
    raw: bool = typer.Option(False, "--raw", help="compare calibrated runs on their raw OOF table"),
) -> None:
    """Ablation report: CV deltas, paired bootstrap CI, McNemar, plots."""
    _setup_logging()
    from vlmexp.report import write_report

    names, overrides = _split_args(runs)
    cfg = _settings(overrides, runs_dir=runs_dir)
    dirs = [_find(r, cfg) for r in names]
    base = _find(baseline, cfg) if baseline else None
    if len({d.resolve() for d in dirs} | ({base.resolve()} if base else set())) < 2:
        raise ConfigError("a report compares two or more different runs; give another run to compare with")
    # The baseline leads the folder name: "A --baseline B" and "A --baseline C" are two reports.
    named = [base, *(d for d in dirs if d != base)] if base else dirs
    out = out or Path(cfg.runs_dir) / "_reports" / "-vs-".join(d.name for d in named)[:120]
    console.print(f"report: {write_report(dirs, baseline=base, out=out, calibrated=not raw)}")


@app.command(name="leaderboard")
@user_errors
def leaderboard_cmd(
    overrides: list[str] = typer.Argument(None, help="key=value, e.g. leaderboard=x.csv data.dir=data/"),
    data: str = typer.Option(None, "--data", help="show this competition; default the configured data.dir"),
    all_: bool = typer.Option(False, "--all", help="every competition on the leaderboard"),
    path: Path = typer.Option(None, "--path", hidden=True, help="same as leaderboard=CSV"),
    md: Path = typer.Option(None, "--md", help="Markdown copy; default beside the CSV"),
    top: int = typer.Option(30, "--top", min=1, help="rows to print (the Markdown copy holds every row)"),
) -> None:
    """Print one competition's leaderboard sorted by CV score and write it as Markdown."""
    from vlmexp import leaderboard

    cfg = _settings(overrides or [], leaderboard=path)
    path = Path(cfg.leaderboard)
    if not path.exists():
        raise FileNotFoundError(f"no leaderboard at {path}: finish a run first (exp run ...)")
    shown = None if all_ else (data or cfg.data.dir)
    md = md or path.with_suffix(".md")
    df = leaderboard.load(path)
    typer.echo(leaderboard.to_markdown(df, top=top, data=shown))
    if shown is not None:
        console.print(f"competition: {shown} (--data DIR for another, --all for every one)")
    if shown is not None and not leaderboard.same_data(df, shown).any():
        console.print(f"{md} left as it was: no run on {shown}")  # not overwritten with an empty table
        return
    leaderboard.write_markdown(path, md, data=shown)
    console.print(f"written: {md}")


@app.command()
@user_errors
def submit(
    run_name_: list[str] = typer.Argument(
        ..., metavar="RUN [key=value...]", help="finished run folder or name; runs_dir=DIR, data.dir=DIR"
    ),
    sample: Path = typer.Option(None, "--sample", help="sample_submission.csv: its columns and row order"),
    out: Path = typer.Option(None, "--out", help="default <run>/submission.csv"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
) -> None:
    """Write the submission CSV of a finished run, validated against the test set."""
    from vlmexp.data import load_competition
    from vlmexp.rundir import RunDir
    from vlmexp.submit import SubmissionError, make_submission

    names, overrides = _split_args(run_name_)
    root = _find(_one(names, "run"), _settings(overrides, runs_dir=runs_dir))
    cfg = RunDir(root).config(overrides)  # e.g. data.dir=... when the run was made from another folder
    if not Path(cfg.data.dir).is_dir():
        raise ConfigError(
            f"run {root} was made with data.dir={cfg.data.dir}, which is not a folder from here "
            f"({Path.cwd()}); run this where the run was made, or add data.dir=PATH"
        )
    # Validated against the whole test set, also for a run made with data.limit (which cut it).
    comp = load_competition(dataclasses.replace(cfg.data, limit=0, train_limit=0))
    try:
        path = make_submission(
            root,
            comp.test["id"].tolist(),
            comp.labels,
            sample=sample,
            out=out,
            force=force,
            id_col=cfg.data.id_col,
        )
    except SubmissionError as e:
        if not cfg.data.limit:
            raise
        raise SubmissionError(
            f"{e}\nThe run used data.limit={cfg.data.limit}: it predicted only the first {cfg.data.limit} "
            "test rows. For a quick run that can be submitted, cut only the training rows: "
            f"data.train_limit={cfg.data.limit}"
        ) from None
    console.print(f"submission: {path}")


def _one(names: list[str], what: str) -> str:
    if len(names) != 1:
        raise ConfigError(f"give exactly one {what} (got {names or 'none'}); settings go as key=value")
    return names[0]


@app.command()
@user_errors
def export(
    source: Path = typer.Argument(
        ..., metavar="RUN_OR_ADAPTER", help="finished run (name/folder) or adapter folder"
    ),
    overrides: list[str] = OVERRIDES,
    fold: int = typer.Option(0, "--fold", help="which fold's adapter of a run"),
    out: Path = typer.Option(None, "--out", help="default <run>/export/fold<k>"),
    force: bool = typer.Option(False, "--force", help="replace an existing export"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
    average_folds: bool = typer.Option(
        False, "--average-folds", help="one model, the folds' LoRA updates averaged: <run>/export/averaged"
    ),
    score: bool = typer.Option(
        False, "--score", help="with --average-folds: predict the test set, set beside the fold ensemble"
    ),
) -> None:
    """Merge a LoRA adapter into its base model and save a standalone folder (`vllm serve` can load it).

    The merged model's logits are checked against base + adapter before the folder is kept.
    """
    _setup_logging()
    from vlmexp.rundir import RunNotFound, find_run

    overrides = overrides or []
    try:
        run = find_run(source, _settings(overrides, runs_dir=runs_dir).runs_dir, finished=False)
    except RunNotFound:
        run = None
    if run is not None and average_folds:
        from vlmexp.models.average import average_adapters

        cfg = run.config(overrides)
        # One adapter whose update is the mean of the folds' (rank K*r), then merged like a fold's.
        folds = [run.adapter_dir(k) for k in range(cfg.folds)]
        adapter = average_adapters(folds, run.path("export") / "averaged_adapter", force=force)
        out = out or run.path("export") / "averaged"
    elif run is not None:
        cfg = run.config(overrides)
        adapter = run.adapter_dir(fold)
        out = out or run.path("export") / f"fold{fold}"
    elif average_folds:
        raise FileNotFoundError(f"--average-folds needs a run (name or folder); {source} is not one")
    else:
        if out is None:
            raise FileNotFoundError(f"{source} is not a run folder; for an adapter folder give --out DIR too")
        cfg, adapter = load_config(overrides), source
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"no LoRA adapter in {adapter} (adapter_config.json missing)")
    from vlmexp.models.export import export_merged  # torch and transformers: after the checks above

    result = export_merged(cfg, adapter, out, force=force)
    console.print(
        f"exported to {result['out_dir']}; max |logit diff| vs base+adapter {result['max_abs_diff']:.2e}"
    )
    if score and run is not None and average_folds:
        from vlmexp.models.average import score_averaged

        console.print(f"averaged model beside the fold ensemble: {score_averaged(run, cfg, adapter)}")


@app.command()
@user_errors
def serve(
    run_name_: list[str] = typer.Argument(
        ..., metavar="RUN [key=value...]", help="run folder or name; runs_dir=DIR"
    ),
    fold: int = typer.Option(None, "--fold", help="serve one fold's model instead of the fold ensemble"),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; loopback by default"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
    max_pixels: int = typer.Option(
        40_000_000, "--max-pixels", min=1, help="most decoded image pixels per request (413 above)"
    ),
) -> None:
    """Serve a finished run as an OpenAI-compatible chat-completions API: the fold ensemble under the
    run's name and each fold as <name>/fold<k> (predict.model_per_fold='{run}/fold{k}' asks those)."""
    _setup_logging()
    from vlmexp.serve import serve as serve_run

    names, overrides = _split_args(run_name_)
    # One finished fold of a run still training can be served (--fold K); serve checks the folds.
    root = _find(_one(names, "run"), _settings(overrides, runs_dir=runs_dir), finished=False)
    serve_run(root, host=host, port=port, fold=fold, max_pixels=max_pixels)


@app.command()
@user_errors
def ensemble(
    runs: list[str] = typer.Argument(..., help="finished runs (names or folders), runs_dir=DIR"),
    name: str = typer.Option("", "--name", help="the new run folder's name; default ens-<hash of the runs>"),
    calibrate: str = typer.Option("none", "--calibrate", help="none, or bias: class offsets fitted on OOF"),
    force: bool = typer.Option(False, "--force", help="replace an existing ensemble folder"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
) -> None:
    """Vote finished runs together: mean test probabilities, CV from their OOF tables, a submission."""
    _setup_logging()
    from vlmexp.kfold.combine import default_name, ensemble_runs
    from vlmexp.rundir import RunDir, find_run

    names, overrides = _split_args(runs)
    cfg = _settings(overrides, runs_dir=runs_dir)
    members = [find_run(r, cfg.runs_dir) for r in names]
    out = RunDir(Path(cfg.runs_dir) / (name or default_name(members, calibrate)))
    ensemble_runs(members, out, calibrate=calibrate, force=force, leaderboard=cfg.leaderboard)
    _print_cv(out.root)
