"""Atomic writes and the one table format every stage shares.

A prediction table has `id`, optionally `label` (gold) and `fold`, then `pred`, then one
probability column per class in class order, named `p:<label>` (e.g. `p:退款页面`).
Writes go to a temporary file in the same folder and are renamed into place, so a run killed
mid-write (kill -9) never leaves a half-written table behind to be read back on resume.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PROB_PREFIX = "p:"


def prob_columns(labels: list[str]) -> list[str]:
    return [PROB_PREFIX + label for label in labels]


def probs(df: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """The (n, n_classes) probability matrix of a prediction table, in class order."""
    return df[prob_columns(labels)].to_numpy(dtype=float)


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - not Linux
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    if path.is_symlink():
        # A symlinked leaderboard (e.g. into a shared folder) is written through, not replaced by a file.
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates 0600; the file gets what open() would give: the old file's mode, or
    # 0666 minus the umask (0644 with the usual umask 022), so teammates can read the results.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    return _atomic_write(Path(path), lambda f: df.to_csv(f, index=False))


def read_table(path: str | Path) -> pd.DataFrame:
    """A table as written: ids and labels stay strings ("007" stays "007", a label "None" or "NA" stays
    that label); only an empty cell is missing (NaN), e.g. a `pred` the model never gave."""
    text = {col: str for col in ("id", "label", "pred", "suggested")}  # suggested: suspect_labels.csv
    return pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])


def write_json(obj: Any, path: str | Path) -> Path:
    return _atomic_write(
        Path(path), lambda f: json.dump(obj, f, indent=2, ensure_ascii=False, default=_jsonable)
    )


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(Path(path), lambda f: f.write(text))


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
