"""`exp`: the command line. Each command is a thin wrapper over one module's function.

The app, its error handling and shared helpers live in cli_common.py; the commands that read
finished runs (report, leaderboard, submit, export, serve, ensemble) in cli_runs.py.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import typer

from vlmexp import cli_runs  # noqa: F401 - registers the run-reading commands on `app`
from vlmexp.cli_common import (  # noqa: F401 - re-exported: `vlmexp.cli:app` is the entry point
    OVERRIDES,
    ConfigError,
    _print_cv,
    _run_config,
    _setup_logging,
    app,
    console,
    data_app,
    load_config,
    prompts_app,
    user_errors,
)
from vlmexp.config import run_name, to_yaml


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
    from vlmexp.data import check_competition
    from vlmexp.data_check import format_check

    cfg = load_config([*(overrides or []), f"data.dir={directory}"])
    result = check_competition(cfg.data, run_cfg=cfg)  # with key=value...: the files that run would read
    console.print(format_check(result))
    if result.problems:
        raise typer.Exit(1)


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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """GPU benchmark on a real-shaped random-weight model vs the tutorial recipe.

    exp bench train|predict|qlora SHAPE [--resolution 448] [--tokens 570] [--batch-size 8] [--steps 8]
    [--modules language,all-linear] [--ablations] [--compile] [--rows NAME:KEY=VALUE,...] [--only-rows]
    [--no-reference] [--images N] [--predict-batch-sizes 32] [--out results.json]
    (SHAPE: qwen2.5-vl-3b, qwen2-vl-7b, or tiny for a CPU smoke run). See docs/performance.md.

    exp bench run --model qwen2.5-vl-3b|tiny:qwen2_vl [--folds 5] [--epochs 2] [--set speed.compile=true ...]
    [--reference-folds 1] [--steady-steps 8] [--parts project,steady,reference] [--workdir DIR]
    [--out run.json]: a whole `exp run` on the demo, wall time by phase, against the step bench's steady
    state and the tutorial recipe per fold (--workdir: reuse its demo and saved model).
    exp bench vision SHAPE [--images 32]: the vision tower alone, lever by lever.
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
