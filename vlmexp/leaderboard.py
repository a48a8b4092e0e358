"""The leaderboard: one CSV row per finished run, appended under a file lock.

Several runs (a sweep on several GPUs) may finish at the same moment, so every write holds an
exclusive `fcntl.flock` on `<csv>.lock`. A row with a column the file lacks (a field added in a
later version) makes the writer rewrite the whole file with the union of columns, still under
the lock, so old rows get empty cells instead of shifting into the wrong columns.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from vlmexp.config import DataConfig
from vlmexp.tables import write_text

DEFAULT_PATH = Path("experiments/leaderboard.csv")

FIELDS = [
    "run",
    "overrides",
    "config_hash",
    "git_sha",
    "metric",
    "cv_mean",
    "cv_std",
    "fold_scores",
    "flag",
    "accuracy",
    "macro_f1",
    "train_size",
    "pseudo_round",
    "pseudo_count",
    "duration_s",
    "finished_at",
    "submission",
    "data",
    "data_fingerprint",
]

# Read back as text: a config hash "12345678" or a git sha "0123e4" must not become a number.
_TEXT = [
    "run",
    "overrides",
    "config_hash",
    "git_sha",
    "metric",
    "fold_scores",
    "flag",
    "finished_at",
    "submission",
    "data",
    "data_fingerprint",
]


@contextmanager
def _locked(path: Path, mode: int) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), mode)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _cell(v: object) -> str:
    """Lists and dicts as JSON (fold_scores "[0.81, 0.79]"), None/NaN as an empty cell."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _csv_text(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def append(row: dict, path: Path = DEFAULT_PATH, *, unique: bool = False) -> bool:
    """Append one run's row to the leaderboard CSV; safe when several processes do it at once.

    With `unique`, a row whose run and config_hash are already there is not added again (a rerun
    that finds a finished run appends its row only if the first run died before it could).
    Returns whether a row was written.
    """
    if not row.get("run"):
        raise ValueError("a leaderboard row needs a 'run' name")
    path = Path(path)
    with _locked(path, fcntl.LOCK_EX):
        if not path.exists() or path.stat().st_size == 0:
            header = FIELDS + [k for k in row if k not in FIELDS]
            write_text(_csv_text([header, [_cell(row.get(k)) for k in header]]), path)
            return True
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            if unique and _has_row(header, reader, row):
                return False
        new = [k for k in row if k not in header]
        if new:
            with open(path, newline="", encoding="utf-8") as f:
                old = list(csv.DictReader(f))
            header += new
            body = [[r.get(k) or "" for k in header] for r in old]
            write_text(_csv_text([header, *body, [_cell(row.get(k)) for k in header]]), path)
            return True
        with open(path, "a+b") as f:
            # A file edited by hand may lack its final newline; the new row must not join the last one.
            f.seek(-1, os.SEEK_END)
            sep = b"" if f.read(1) == b"\n" else b"\n"
            # One write call of one line; the lock keeps other writers out meanwhile.
            f.write(sep + _csv_text([[_cell(row.get(k)) for k in header]]).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    return True


def _has_row(header: list[str], rows: Iterator[list[str]], row: dict) -> bool:
    if "run" not in header or "config_hash" not in header:
        return False
    i, j = header.index("run"), header.index("config_hash")
    want = (_cell(row.get("run")), _cell(row.get("config_hash")))
    return any(len(r) > max(i, j) and (r[i], r[j]) == want for r in rows)


def load(path: Path = DEFAULT_PATH) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no leaderboard at {path}: finish a run first (exp run ...)")
    with _locked(path, fcntl.LOCK_SH):
        df = pd.read_csv(path, dtype={c: str for c in _TEXT}, keep_default_na=False, na_values=[""])
    return _whole_numbers(_legacy_columns(df))


# Counts stay integers when some rows lack them: an `exp ensemble` row has no train_size, and pandas
# would otherwise read the column as float and print 400 as "400.0000".
_COUNTS = ("train_size", "pseudo_round", "pseudo_count")


def _whole_numbers(df: pd.DataFrame) -> pd.DataFrame:
    for col in _COUNTS:
        if col in df.columns:
            values = pd.to_numeric(df[col], errors="coerce")
            if (values.dropna() % 1 == 0).all():
                df[col] = values.astype("Int64")
    return df


def _legacy_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Files written before the baseline columns were named for their metric still load.

    `majority_baseline` held the majority-class score in the row's own metric, e.g. a row with
    metric macro_f1 and majority_baseline 0.0185 becomes majority_macro_f1 0.0185.
    """
    for old, prefix in (("majority_baseline", "majority_"), ("test_majority_baseline", "test_majority_")):
        if old not in df.columns:
            continue
        for metric in df["metric"].dropna().unique() if "metric" in df.columns else []:
            col, rows = prefix + metric, (df["metric"] == metric) & df[old].notna()
            if col not in df.columns:
                df[col] = float("nan")
            df.loc[rows & df[col].isna(), col] = df.loc[rows & df[col].isna(), old]
        df = df.drop(columns=old)
    return _infer_data(df)


def _infer_data(df: pd.DataFrame) -> pd.DataFrame:
    """Rows from before the `data` column: their data.dir is in `overrides`, or was the default.

    e.g. overrides "folds=3 data.dir=mycomp" -> data "mycomp"; "folds=3" -> "demo_data".
    """
    if "overrides" not in df.columns:
        return df
    if "data" not in df.columns:
        df["data"] = pd.Series(pd.NA, index=df.index, dtype=object)
    missing = df["data"].isna() | (df["data"] == "")
    given = df.loc[missing, "overrides"].fillna("").str.extract(r"(?:^| )data\.dir=(\S+)")[0]
    df.loc[missing, "data"] = given.fillna(DataConfig().dir)
    return df


def same_data(df: pd.DataFrame, data_dir: str | Path) -> pd.Series:
    """Which rows were run on the competition folder `data_dir` (paths compared after resolving)."""
    if "data" not in df.columns:
        return pd.Series(False, index=df.index)
    want = Path(data_dir).resolve()
    return df["data"].map(lambda d: isinstance(d, str) and bool(d) and Path(d).resolve() == want)


def _fmt(v: object) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_cell(v: object, column: str) -> str:
    """A table cell: seconds to one decimal (duration_s 28.3), other numbers as `_fmt` writes them."""
    if column == "duration_s" and isinstance(v, float) and not math.isnan(v):
        return f"{v:.1f}"
    return _fmt(v)


def to_markdown(
    df: pd.DataFrame, metric: str | None = None, top: int | None = None, data: str | Path | None = None
) -> str:
    """A Markdown table, best cv_mean first; `top` keeps the best N. With `metric`, only that metric's runs.

    Runs ranked by different metrics are not comparable, so without `metric` they are grouped.
    With `data` (a competition folder), only the runs on that competition; a note counts the rest.
    """
    note = ""
    if data is not None:
        mine = same_data(df, data)
        if (~mine).any():
            n = int((~mine).sum())
            note = f"\n_{n} run{'s' * (n != 1)} on other competitions (or of unknown data) not shown_\n"
        df = df[mine]
    if metric is not None and "metric" in df.columns:
        df = df[df["metric"] == metric]
    if df.empty:
        return ("_no runs yet_" if data is None else f"_no runs on {data} yet_") + "\n" + note
    keys = (["metric"] if "metric" in df.columns and metric is None else []) + ["cv_mean"]
    df = df.sort_values(keys, ascending=[True] * (len(keys) - 1) + [False], kind="stable", na_position="last")
    df = df.head(top) if top else df
    majority = [c for c in df.columns if c.startswith("majority_")]
    shown = [
        c
        # every CV with its provenance: the fold scores behind it, the config hash and the git sha
        for c in ["run", "metric", "cv_mean", "cv_std", "fold_scores", *majority, "flag", "accuracy"]
        + [
            "macro_f1",
            "test_accuracy",
            "test_macro_f1",
            "train_size",
            "pseudo_count",
            "overrides",
            "data",
            "config_hash",
            "git_sha",
            "duration_s",
        ]
        if c in df.columns
    ]
    lines = ["| # | " + " | ".join(shown) + " |", "|" + "---|" * (len(shown) + 1)]
    for rank, (_, r) in enumerate(df.iterrows(), start=1):
        lines.append(f"| {rank} | " + " | ".join(_md_cell(r[c], c) for c in shown) + " |")
    return "\n".join(lines) + "\n" + note


def write_markdown(
    path_csv: Path = DEFAULT_PATH,
    path_md: Path | None = None,
    metric: str | None = None,
    data: str | Path | None = None,
) -> Path:
    """Write `to_markdown(load(path_csv))` next to the CSV (leaderboard.md) or to `path_md`."""
    path_md = Path(path_md) if path_md else Path(path_csv).with_suffix(".md")
    return write_text(to_markdown(load(path_csv), metric, data=data), path_md)
