"""`exp`: the command line. Each command is a thin wrapper over one module's function.

Errors a user can fix (bad config key, broken data, malformed submission) print one clear
message and exit 2 instead of a traceback; everything already computed stays on disk.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from vlmexp.config import Config, ConfigError, load_config, run_name, to_yaml

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="K-fold SFT of VLMs for image classification."
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect competition data.")
app.add_typer(data_app, name="data")
prompts_app = typer.Typer(no_args_is_help=True, help="List and preview prompt templates.")
app.add_typer(prompts_app, name="prompts")
console = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="key=value overrides, e.g. prompt=label_desc folds=5 train.lr=1e-4")


# Deprecation notices the libraries print in every run about their own internals, not about what
# the user asked for; filtered by exact message, so any other warning still shows.
KNOWN_WARNINGS = [
    # transformers 5.x deprecates the property that peft (PeftModel.__init__) and trl still read.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]


@app.callback()
def _start() -> None:
    """K-fold SFT of VLMs for image classification."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    # transformers/trl chatter would bury our progress display; warnings still show.
    for noisy in ("transformers", "trl", "peft", "accelerate", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every CPU import that an optional faster 4-bit kernel (the `kernels`
    # package) is missing, whether or not the run quantises; 4-bit still works without it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def user_errors(fn):
    """Turn the errors a user can fix into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not isinstance(e, _fixable()):
                raise
            # Escaped: a message may quote a value like lora.modules_to_save=[lm_head]; not wrapped, so a
            # long path in it stays one piece to copy.
            console.print("[bold red]error:[/]", escape(str(e)), soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _fixable() -> tuple[type[Exception], ...]:
    from vlmexp.data import DataError
    from vlmexp.ocr.reader import OcrError
    from vlmexp.openai_client import ServerError
    from vlmexp.prompts.render import PromptError
    from vlmexp.reasons import ReasonsError
    from vlmexp.submit import SubmissionError

    fixable = (ConfigError, DataError, SubmissionError, PromptError, OcrError, ReasonsError, ServerError)
    # Only a command that imported the report module can raise its error; `exp config` need not load scipy.
    report = sys.modules.get("vlmexp.report")
    return (*fixable, *((report.ReportError,) if report else ()), FileNotFoundError, FileExistsError)


def _split_args(items: list[str] | None) -> tuple[list[str], list[str]]:
    """`exp report runs/A B runs_dir=elsewhere` -> (["runs/A", "B"], ["runs_dir=elsewhere"])."""
    names, overrides = [], []
    for item in items or []:
        (overrides if "=" in item else names).append(item)
    return names, overrides


def _settings(overrides: list[str], **aliases: object) -> Config:
    """A command's config from key=value arguments, as `exp run` reads them; the old flags
    (--runs-dir, --path) still work and mean runs_dir=..., leaderboard=..."""
    return load_config([*overrides, *(f"{k}={v}" for k, v in aliases.items() if v is not None)])


def _find(name: str, cfg: Config, finished: bool = True) -> Path:
    from vlmexp.rundir import find_run

    return find_run(name, cfg.runs_dir, finished=finished).root


@app.command()
@user_errors
def config(overrides: list[str] = OVERRIDES) -> None:
    """Print the resolved config (defaults < experiments/<experiment>.yaml < key=value)."""
    cfg = _run_config(overrides)
    typer.echo(f"# run name: {run_name(cfg)}")
    typer.echo(to_yaml(cfg))


@app.command()
@user_errors
def run(
    overrides: list[str] = OVERRIDES,
    force: bool = typer.Option(False, "--force", help="redo finished folds instead of resuming"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run (or resume) one K-fold experiment: exp run prompt=label_desc folds=5."""
    _setup_logging(verbose)
    from vlmexp.recipe import run_experiment

    cfg = _run_config(overrides)
    run_dir = run_experiment(cfg, force=force)
    _print_cv(run_dir.root)


def _run_config(overrides: list[str] | None) -> Config:
    """The config of a run to make; its name must be one plain folder (`name=..` is refused here)."""
    from vlmexp.rundir import check_run_name

    cfg = load_config(overrides)
    check_run_name(run_name(cfg))
    return cfg


def _print_cv(root: Path) -> None:
    from vlmexp.rundir import RunDir

    cv = RunDir(root).cv()
    folds = " ".join(f"{s:.4f}" for s in cv["folds"])
    console.print(
        f"[bold green]{escape(root.name)}[/]: CV {cv['metric']} {cv['mean']:.4f} ± {cv['std']:.4f} "
        f"(folds {folds}; accuracy {cv['accuracy']:.4f}) -> {escape(str(root))}/submission.csv"
    )
    if cv.get("flag"):  # sanity.run_flags: e.g. "one_class near_majority"; the log said what helps
        majority = cv.get(f"majority_{cv['metric']}", float("nan"))
        console.print(
            f"[bold yellow]flagged: {cv['flag']}[/] (majority-class baseline {majority:.4f}); "
            "see the warning above for what usually helps"
        )


def expand_grid(overrides: list[str]) -> list[list[str]]:
    """`prompt=a,b lora.r=8,16` -> the 4 override lists of the grid (list values `[a,b]` are kept whole)."""
    axes = []
    for item in overrides:
        key, _, value = item.partition("=")
        values = [value] if value.startswith("[") else value.split(",")
        axes.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


@app.command()
@user_errors
def sweep(
    overrides: list[str] = OVERRIDES,
    force: bool = typer.Option(False, "--force"),
    report_out: Path = typer.Option(
        None, "--report", help="report folder; default runs/_reports/sweep-<runs>"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a grid (skipping finished runs), then one report over it: exp sweep prompt=baseline,label_desc."""
    _setup_logging(verbose)
    from vlmexp.recipe import run_experiment, run_experiments
    from vlmexp.report import write_report

    grid = expand_grid(overrides)
    configs = [_run_config(o) for o in grid]  # every point validated before any training starts
    runs = []
    if any(cfg.launcher == "ray" for cfg in configs):
        # Every unfinished fold of every point goes to the cluster at once (launch/ray_tasks.py).
        runs = [run.root for run in run_experiments(configs, force=force)]
        for root in runs:
            _print_cv(root)
    for i, cfg in enumerate(configs if not runs else []):
        console.rule(f"sweep {i + 1}/{len(configs)}: {' '.join(grid[i])}")
        runs.append(run_experiment(cfg, force=force).root)
        _print_cv(runs[-1])
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(r.name for r in runs))[:80]
    out = report_out or Path(configs[0].runs_dir) / "_reports" / f"sweep-{tag}"
    path = write_report(runs, baseline=None, out=out)
    console.print(f"report: {path}")


@app.command()
@user_errors
def report(
    runs: list[str] = typer.Argument(..., help="run folders or names, plus key=value such as runs_dir=DIR"),
    baseline: str = typer.Option(None, "--baseline", help="run to compare against; default the first"),
    out: Path = typer.Option(None, "--out", help="report folder; default <runs_dir>/_reports/<runs>"),
    runs_dir: Path = typer.Option(None, "--runs-dir", hidden=True, help="same as runs_dir=DIR"),
) -> None:
    """Ablation report: CV deltas, paired bootstrap CI, McNemar, plots."""
    _setup_logging()
    from vlmexp.report import write_report

    names, overrides = _split_args(runs)
    cfg = _settings(overrides, runs_dir=runs_dir)
    dirs = [_find(r, cfg) for r in names]
    base = _find(baseline, cfg) if baseline else None
    out = out or Path(cfg.runs_dir) / "_reports" / "-vs-".join(d.name for d in dirs)[:120]
    console.print(f"report: {write_report(dirs, baseline=base, out=out)}")


@app.command(name="leaderboard")
@user_errors
def leaderboard_cmd(
    overrides: list[str] = typer.Argument(None, help="key=value, e.g. leaderboard=x.csv data.dir=data/"),
    data: str = typer.Option(None, "--data", help="show this competition; default the configured data.dir"),
    all_: bool = typer.Option(False, "--all", help="every competition on the leaderboard"),
    path: Path = typer.Option(None, "--path", hidden=True, help="same as leaderboard=CSV"),
    md: Path = typer.Option(None, "--md", help="Markdown copy; default beside the CSV"),
    top: int = typer.Option(30, "--top"),
) -> None:
    """Print one competition's leaderboard sorted by CV score and write it as Markdown."""
    from vlmexp import leaderboard

    cfg = _settings(overrides or [], leaderboard=path)
    path = Path(cfg.leaderboard)
    if not path.exists():
        raise FileNotFoundError(f"no leaderboard at {path}: finish a run first (exp run ...)")
    shown = None if all_ else (data or cfg.data.dir)
    md = md or path.with_suffix(".md")
    leaderboard.write_markdown(path, md, data=shown)
    df = leaderboard.load(path)
    typer.echo(leaderboard.to_markdown(df, top=top, data=shown))
    if shown is not None:
        console.print(f"competition: {shown} (--data DIR for another, --all for every one)")
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
    comp = load_competition(cfg.data)
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
def demo(
    out: Path = typer.Argument(Path("demo_data"), help="folder to write the demo competition into"),
    seed: int = typer.Option(0, "--seed"),
    hierarchy: bool = typer.Option(
        False, "--hierarchy", help="two-level variant: the 12 classes under 4 parents, labels parent/child"
    ),
) -> None:
    """Write the bundled synthetic e-commerce screenshot competition (deterministic)."""
    from vlmexp.demo import make_demo

    path = make_demo(out, seed=seed, hierarchy=hierarchy)
    console.print(f"demo competition written to {path}; next: exp data check {path}")


@data_app.command("check")
@user_errors
def data_check(
    directory: Path = typer.Argument(..., metavar="DIR"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Load a competition folder, print a summary and every problem with file, row and fix."""
    from vlmexp.data import check_competition, format_check

    cfg = load_config([*(overrides or []), f"data.dir={directory}"])
    result = check_competition(cfg.data, run_cfg=cfg)  # with key=value...: the files that run would read
    console.print(format_check(result))
    if result.problems:
        raise typer.Exit(1)


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


@app.command()
@user_errors
def ocr(
    directory: Path = typer.Argument(..., metavar="DATA"),
    overrides: list[str] = OVERRIDES,
    workers: int = typer.Option(0, "--workers", help="OCR processes; 0 = all cores"),
) -> None:
    """Read the text of every train and test image into the cache (only what is missing)."""
    from vlmexp.ocr import run_ocr_on_competition

    cfg = load_config([*(overrides or []), f"data.dir={directory}"])
    stats = run_ocr_on_competition(cfg.data, cfg.ocr, workers=workers)
    console.print(stats)


@app.command()
@user_errors
def reasons(
    directory: Path = typer.Argument(..., metavar="DATA"),
    base_url: str = typer.Option(
        ..., "--base-url", help="OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1"
    ),
    model: str = typer.Option(..., "--model", help="teacher model name on that server"),
    out: Path = typer.Option(None, "--out", help="JSONL cache; default DATA/reasons.jsonl"),
    out_csv: str = typer.Option("train_with_reasons.csv", "--out-csv", help="train.csv copy with reasons"),
    concurrency: int = typer.Option(8, "--concurrency"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="variable holding the API key"),
    max_retries: int = typer.Option(5, "--max-retries"),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Teacher-written reasons for every training row (never the test set), cached and resumable."""
    _setup_logging()
    from vlmexp.reasons import reasons_for_competition

    cfg = load_config([*(overrides or []), f"data.dir={directory}"])
    stats = reasons_for_competition(
        cfg.data,
        base_url=base_url,
        model=model,
        out_jsonl=out,
        out_csv=out_csv,
        concurrency=concurrency,
        api_key_env=api_key_env,
        max_retries=max_retries,
    )
    console.print(stats)


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
    ensemble_runs(members, out, calibrate=calibrate, force=force)
    _print_cv(out.root)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """GPU benchmark on a real-shaped random-weight model vs the tutorial recipe.

    exp bench train|predict|qlora SHAPE [--resolution 448] [--tokens 570] [--batch-size 8] [--steps 8]
    [--modules language,all-linear] [--ablations] [--compile] [--rows NAME:KEY=VALUE,...] [--only-rows]
    [--no-reference] [--images N] [--predict-batch-sizes 32] [--out results.json]
    (SHAPE: qwen2.5-vl-3b, qwen2-vl-7b, or tiny for a CPU smoke run). See docs/performance.md.

    exp bench run --model qwen2.5-vl-3b|tiny:qwen2_vl [--folds 5] [--epochs 2] [--set speed.compile=true ...]
    [--reference-folds 1] [--steady-steps 8] [--no-reference] [--out run.json]: a whole `exp run` on the
    demo, wall time by phase, against the step bench's steady state and the tutorial recipe per fold.
    """
    from vlmexp.bench.__main__ import main as bench_main

    # The bench keeps its own argparse so it also runs as `python -m vlmexp.bench` on the GPU
    # machine, where the project is not pip-installed; `exp bench` just forwards to it.
    bench_main(ctx.args)


@prompts_app.command("list")
@user_errors
def prompts_list(directory: str = typer.Option("", "--dir", help="your own templates folder")) -> None:
    """Names of the prompt variants (shipped, plus those in --dir)."""
    from vlmexp.prompts.render import available_templates

    for name in available_templates(directory):
        typer.echo(name)


@prompts_app.command("show")
@user_errors
def prompts_show(
    overrides: list[str] = OVERRIDES,
    row: int = typer.Option(0, "--row", help="training row to render (0-based)"),
) -> None:
    """Render one training row with the configured prompt, plus length and reason-quality checks."""
    from vlmexp.data import load_competition
    from vlmexp.prompts.checks import label_restating_share, long_prompts, near_duplicate_share, prompt_stats
    from vlmexp.prompts.render import load_template, render_sample

    cfg = load_config(overrides)
    comp = load_competition(cfg.data)
    tpl = load_template(cfg.prompt, cfg.prompts.dir)
    rows = comp.train.to_dict("records")
    if not 0 <= row < len(rows):
        raise ConfigError(
            f"--row {row}: {cfg.data.train_csv} has {len(rows)} rows; give one of 0..{len(rows) - 1}"
        )
    names = {"labels": comp.labels, "descriptions": comp.descriptions, "tree": comp.tree}
    rendered = [render_sample(tpl, **names, row=r) for r in rows]
    r = rendered[row]
    if cfg.ocr.enabled:
        from vlmexp.ocr import ocr_text_for

        # The text this row's prompt gets in a run (read once, then cached for every run).
        cell = str(rows[row]["image"])
        text = ocr_text_for([cell], cfg.ocr, progress=False)[cell]
        r = render_sample(tpl, **names, row=rows[row], ocr_text=text)
    for part in ("system", "user", "answer"):
        console.rule(part)
        typer.echo(getattr(r, part))
    console.rule("checks")
    without = " (without OCR text: only the row shown was read)" if cfg.ocr.enabled else ""
    typer.echo(f"prompt length{without}: {prompt_stats(rendered)}")
    typer.echo(
        f"over the {cfg.prompts.budget}-char budget: {len(long_prompts(rendered, cfg.prompts.budget))} rows"
    )
    if "reason" in comp.train:
        reasons = comp.train["reason"].fillna("").tolist()
        typer.echo(
            f"near-duplicate reasons: {near_duplicate_share(reasons):.1%}; "
            f"reasons that only restate the label: {label_restating_share(reasons, comp.labels):.1%}"
        )


def main() -> None:  # pragma: no cover
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
