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

from vlmexp.config import Config, ConfigError, config_hash, diff_from_defaults, run_name, to_yaml
from vlmexp.tables import read_json, write_json, write_text

_VERSIONED = ("vlmexp", "torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "scikit-learn")


def git_state(cwd: Path | None = None) -> dict:
    """{"sha": ..., "dirty": bool}; sha "unknown" outside a git checkout (e.g. an installed wheel)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
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


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def for_config(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.runs_dir) / run_name(cfg))

    # -- layout ---------------------------------------------------------------
    def fold_dir(self, k: int) -> Path:
        return self.root / "folds" / f"fold{k}"

    def fold_done(self, k: int) -> bool:
        return (self.fold_dir(k) / "done.json").exists()

    def mark_fold_done(self, k: int, info: dict) -> None:
        write_json(info, self.fold_dir(k) / "done.json")

    @property
    def finished(self) -> bool:
        return (self.root / "cv.json").exists()

    def path(self, name: str) -> Path:
        return self.root / name

    # -- start / resume -----------------------------------------------------
    def start(self, cfg: Config, prompt_sources: dict[str, str], force: bool = False) -> dict:
        """Create or resume the folder. Returns the provenance dict written to provenance.json.

        Resuming needs the same config hash: a folder named `name=foo` that holds another
        config is refused rather than silently mixed.
        """
        h = config_hash(cfg)
        if self.root.exists() and force:
            shutil.rmtree(self.root)
        if (self.root / "provenance.json").exists():
            old = read_json(self.root / "provenance.json")
            if old.get("config_hash") != h:
                raise ConfigError(
                    f"run folder {self.root} holds config {old.get('config_hash')}, this config is {h}; "
                    "choose another name=..., or pass --force to redo it from scratch"
                )
            old["resumed_at"] = old.get("resumed_at", []) + [time.strftime("%Y-%m-%dT%H:%M:%S")]
            write_json(old, self.root / "provenance.json")
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
        write_json(prov, self.root / "provenance.json")
        return prov

    def overrides(self) -> dict:
        return json.loads((self.root / "overrides.json").read_text(encoding="utf-8"))
