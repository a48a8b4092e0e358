"""The live display of a run: one bar over folds, one over the current fold's training steps.

Falls back to plain log lines when stdout is not a terminal (CI logs, `nohup`), so a long
run still tells you where it is without drawing escape codes into a file.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("vlmexp")


class RunProgress:
    def __init__(self, n_folds: int, title: str, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.n_folds = n_folds
        self.title = title
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self._folds = None
        self._steps = None

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        self._folds = self.progress.add_task(self.title, total=self.n_folds, info="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def skip_fold(self, k: int) -> None:
        self.progress.advance(self._folds)
        log.info("fold %d already finished: skipped", k)

    def start_fold(self, k: int) -> None:
        if self._steps is not None:
            self.progress.remove_task(self._steps)
        self._steps = self.progress.add_task(f"fold {k} train", total=None, info="")
        log.info("fold %d: training", k)

    def on_log(self, entry: dict) -> None:
        """Called with each trainer log entry, e.g. {"step": 12, "max_steps": 60, "loss": 1.93}."""
        if self._steps is None:
            return
        info = " ".join(
            f"{k}={entry[k]:.4g}" for k in ("loss", "eval_accuracy", "eval_macro_f1") if k in entry
        )
        update = {"info": info}
        if "max_steps" in entry:
            update["total"] = entry["max_steps"]
        if "step" in entry:
            update["completed"] = entry["step"]
        self.progress.update(self._steps, **update)
        if not self.console.is_terminal and info:
            log.info("step %s %s", entry.get("step", "?"), info)

    def end_fold(self, k: int, value: float) -> None:
        self.progress.advance(self._folds)
        self.progress.update(self._folds, info=f"fold {k}: {value:.4f}")
        log.info("fold %d done: %.4f", k, value)
