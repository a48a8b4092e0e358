"""One run = one folder `runs/<name>/`: resolved config, prompt source, provenance, per-fold outputs.

A fold counts as finished only when `folds/fold{k}/done.json` exists, and that file is written
last and atomically, so a run killed with kill -9 in the middle of fold 3 resumes at fold 3
with folds 0-2 read back as they were.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

from vlmexp.config import (
    Config,
    ConfigError,
    config_hash,
    diff_from_defaults,
    load_config_file,
    run_name,
    to_yaml,
)
from vlmexp.tables import read_json, write_json, write_text

_VERSIONED = ("vlmexp", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "scikit-learn")


def git_state(cwd: Path | None = None) -> dict:
    """{"sha": ..., "dirty": bool} of the vlmexp checkout whose code runs (or of `cwd`'s repository),
    wherever the command is started: from /tmp/comp, the current folder's repository (or none) says
    nothing about the code. sha "unknown" when vlmexp is not a tracked file of a git checkout (an
    installed wheel, or a virtualenv inside some other repository)."""
    here = Path(__file__).resolve()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd or here.parent, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        if cwd is None:
            git("ls-files", "--error-unmatch", here.name)  # fails unless this file is tracked there
        return {
            "sha": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (subprocess.SubprocessError, FileNotFoundError):
        return {"sha": "unknown", "dirty": None}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class RunNotFound(FileNotFoundError):
    """No run folder by that name or path, or one that has not finished; the message says which."""


def check_run_name(name: str) -> str:
    """The name must be one plain folder inside runs_dir: `name=..` with --force once deleted the parent."""
    bad = not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip()
    if bad:
        raise ConfigError(
            f"run name {name!r} is not one plain folder name; use letters, digits, '-', '_' or '.', "
            "e.g. name=baseline-v2 (no '/', '\\', '..' or surrounding spaces)"
        )
    return name


class RunDir:
    """The run folder's layout: every other module asks here instead of spelling `folds/fold{k}/...`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_config(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.runs_dir) / check_run_name(run_name(cfg)))

    # -- layout ---------------------------------------------------------------
    def fold_dir(self, k: int) -> Path:
        return self.root / "folds" / f"fold{k}"

    def adapter_dir(self, k: int) -> Path:
        """Fold k's LoRA adapter (or whole model for model.finetune=full), as engine/train.py saves it."""
        return self.fold_dir(k) / "adapter"

    def train_result_path(self, k: int) -> Path:
        """Fold k's training result (best epoch and metric, logs), written once its adapter is saved."""
        return self.fold_dir(k) / "train_result.json"

    def checkpoint_dir(self, k: int) -> Path:
        """Fold k's trainer checkpoints (the last and the best), from which a killed fold resumes."""
        return self.fold_dir(k) / "checkpoints"

    def train_log_path(self, k: int) -> Path:
        """Fold k's log.jsonl: one JSON line per trainer log (step, epoch, loss, lr, eval metrics)."""
        return self.fold_dir(k) / "log.jsonl"

    def tensorboard_dir(self, k: int) -> Path:
        """Fold k's TensorBoard events, all folds of a run under one folder: `tensorboard --logdir runs`."""
        return self.root / "tb" / f"fold{k}"

    def fold_task_path(self, k: int) -> Path:
        """Which process runs fold k ({"host", "pid", "started_at"}), written as the fold starts."""
        return self.fold_dir(k) / "task.json"

    def fold_done(self, k: int) -> bool:
        return (self.fold_dir(k) / "done.json").exists()

    def done_folds(self, n_folds: int) -> list[int]:
        return [k for k in range(n_folds) if self.fold_done(k)]

    def mark_fold_done(self, k: int, info: dict) -> None:
        write_json(info, self.fold_dir(k) / "done.json")
        # A finished fold resumes no more: its best weights are in adapter/ (checkpoints hold the
        # optimizer state too, e.g. 3x a LoRA adapter's size, or 3x the model's for finetune=full).
        shutil.rmtree(self.checkpoint_dir(k), ignore_errors=True)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def cv_path(self) -> Path:
        return self.root / "cv.json"

    @property
    def provenance_path(self) -> Path:
        return self.root / "provenance.json"

    @property
    def leaderboard_row_path(self) -> Path:
        """The row this run appends, kept so a rerun can append it if the run died before it did."""
        return self.root / "leaderboard_row.json"

    @property
    def finished(self) -> bool:
        return self.cv_path.exists()

    @property
    def is_run(self) -> bool:
        """A vlmexp run folder (it has provenance.json), not some other folder of the same name."""
        return self.provenance_path.exists()

    def path(self, name: str) -> Path:
        return self.root / name

    def config(self, overrides: list[str] | None = None) -> Config:
        """The Config this run was made with (its config.yaml), plus optional key=value overrides."""
        return load_config_file(self.config_path, overrides)

    def cv(self) -> dict:
        return read_json(self.cv_path)

    def holds_results(self) -> bool:
        """Whether anything computed is inside: cv.json, or any file a fold wrote beyond the bookkeeping
        of its start (a finished fold, a trainer checkpoint a resume starts from, a training log)."""
        startup = {"class_counts.json", "task.json"}
        return self.finished or any(
            p.is_file() and p.name not in startup for p in (self.root / "folds").rglob("*")
        )

    # -- start / resume -----------------------------------------------------
    def start(
        self,
        cfg: Config,
        prompt_sources: dict[str, str],
        force: bool = False,
        fingerprint: dict | None = None,
    ) -> dict:
        """Create or resume the folder. Returns the provenance dict written to provenance.json.

        Resuming needs the same config hash: a folder named `name=foo` that holds another
        config is refused rather than silently mixed.
        """
        h = config_hash(cfg)
        check_run_name(self.root.name)
        if self.root.exists() and force:
            if not self.is_run:
                # `name=..` or `name=data` would otherwise point --force at a folder that is not ours.
                raise ConfigError(
                    f"--force would delete {self.root}, which is not a vlmexp run (no provenance.json); "
                    "choose another name=... or move that folder away yourself"
                )
            shutil.rmtree(self.root)
        if self.is_run:
            old = self.same_run(cfg, fingerprint)
            old["resumed_at"] = old.get("resumed_at", []) + [time.strftime("%Y-%m-%dT%H:%M:%S")]
            write_json(old, self.provenance_path)
            return old
        self.root.mkdir(parents=True, exist_ok=True)
        write_text(to_yaml(cfg), self.root / "config.yaml")
        write_json(diff_from_defaults(cfg), self.root / "overrides.json")
        # Every file of the template's extends chain, e.g. label_desc.jinja and baseline.jinja:
        # the prompt a run trained on can be read back exactly, even after the package changes.
        for file_name, text in prompt_sources.items():
            write_text(text, self.root / "prompt" / file_name)
        prov = {
            "run": self.root.name,
            "config_hash": h,
            "git": git_state(),
            "versions": library_versions(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if fingerprint is not None:
            prov["data_fingerprint"] = fingerprint  # fingerprint.competition_fingerprint: the folds' data
        write_json(prov, self.provenance_path)
        return prov

    def same_run(self, cfg: Config, fingerprint: dict | None = None) -> dict:
        """This folder's provenance, once it is known to hold `cfg`'s run on the same data: a `name=...`
        reused for another config (e.g. train.epochs=1 where the folder ran 2) or a folder whose data
        was edited since is refused, finished or not, instead of handing back results it did not make."""
        old = read_json(self.provenance_path)
        h = config_hash(cfg)
        if old.get("config_hash") != h:
            raise ConfigError(
                f"run folder {self.root} holds config {old.get('config_hash')}, this config is {h}; "
                "choose another name=..., or pass --force to redo it from scratch"
            )
        _refuse_other_data(self.root, old.get("data_fingerprint"), fingerprint)
        return old

    def overrides(self) -> dict:
        return json.loads((self.root / "overrides.json").read_text(encoding="utf-8"))

    def discard_if_empty(self) -> bool:
        """After a failure of the run that created this folder: remove it if nothing computed is inside.

        A run that dies while loading data (e.g. a typo in data.dir) would otherwise leave
        `runs/baseline-1a2b3c4d/` with only config.yaml behind, looking like a started run.
        """
        if self.root.is_dir() and self.is_run and not self.holds_results():
            shutil.rmtree(self.root, ignore_errors=True)
            return True
        return False


def _refuse_other_data(root: Path, old: dict | None, new: dict | None) -> None:
    """The data config hashes the data.dir path, not its content: an edited train.csv is caught here."""
    if not old or not new or old.get("digest") == new.get("digest"):
        return
    from vlmexp.fingerprint import fingerprint_changes

    changes = "\n".join(f"  - {c}" for c in fingerprint_changes(old, new))
    raise ConfigError(
        f"run folder {root} was started on other data; since then:\n{changes}\n"
        "Its finished folds would be mixed with the edited data. Start a new run (another name=...), "
        "or pass --force to redo this one from scratch; to keep the old results, restore the data."
    )


def find_run(name_or_path: str | Path, runs_dir: str | Path = "runs", *, finished: bool = True) -> RunDir:
    """A run by its folder path (from anywhere) or by its name under runs_dir; the one run finder.

    With `finished`, the run must have its cv.json (e.g. `exp submit`, `pseudo.source=`);
    without, any run folder will do (e.g. `exp serve --fold 0` on a run still training).
    """
    if not str(name_or_path).strip():
        raise RunNotFound("no run given; name one, e.g. baseline-1a2b3c4d or runs/baseline-1a2b3c4d")
    tried = [Path(name_or_path), Path(runs_dir) / name_or_path]
    for p in tried:
        run = RunDir(p)
        if run.config_path.exists() or run.finished:
            if finished and not run.finished:
                raise RunNotFound(
                    f"run {p} has not finished (no cv.json); resume it with the same `exp run ...` "
                    "command, or pick a finished run from `exp leaderboard`"
                )
            return run
    looked = " and ".join(str(p / "config.yaml") for p in dict.fromkeys(tried))
    raise RunNotFound(
        f"no run '{name_or_path}' (looked for {looked}); give the run's folder, "
        f"or its name with runs_dir=DIR if it lives elsewhere (see `exp leaderboard`)"
    )
