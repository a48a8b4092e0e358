"""The `exp` app and what its commands share: settings from key=value, finding runs, clear errors.

Errors a user can fix (bad config key, broken data, malformed submission) print one clear
message and exit 2 instead of a traceback; everything already computed stays on disk.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from vlmexp.config import Config, ConfigError, load_config, run_name

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
    # bitsandbytes warns on every CPU import that an optional faster 4-bit kernel (the `kernels`
    # package) is missing, whether or not the run quantises; 4-bit still works without it. Set before
    # any command runs: `exp config train.args.x=1` imports trl (and so bitsandbytes) to check the name.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
    sub = root / "submission.csv"
    # A data.limit run predicted part of the test set and wrote none (recipe.finalize says why).
    where = escape(str(sub)) if sub.exists() else "no submission (data.limit cut the test set)"
    console.print(
        f"[bold green]{escape(root.name)}[/]: CV {cv['metric']} {cv['mean']:.4f} ± {cv['std']:.4f} "
        f"(folds {folds}; accuracy {cv['accuracy']:.4f}) -> {where}"
    )
    if cv.get("flag"):  # sanity.run_flags: e.g. "one_class near_majority"; a reused run logged nothing
        from vlmexp import sanity

        majority = cv.get(f"majority_{cv['metric']}", float("nan"))
        console.print(
            f"[bold yellow]flagged: {cv['flag']}[/] (majority-class baseline {majority:.4f}); {sanity.ADVICE}"
        )
