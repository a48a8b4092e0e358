"""Load and check a competition folder: train.csv, test.csv, labels.json and the images.

Every check collects `Problem`s instead of stopping at the first, so one run of
`exp data check DIR` lists every bad row (a missing image in row 3 never hides a bad label in row 9).
Row numbers are 1-based data rows: row 1 is the line right after the header.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps
from rich.console import Group
from rich.table import Table
from rich.text import Text

from vlmexp.config import DataConfig

CANONICAL = ("id", "image", "label", "reason", "group")
GOOD_SIDE = (300, 1000)  # longest side in px; smaller loses screenshot text, larger costs image tokens
Frame = pd.DataFrame | None
MAX_LISTED = 100  # problems spelled out in a DataError message; all stay on `.problems`


class DataError(ValueError):
    """The competition data is invalid; the message lists every problem and its fix."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass
class Problem:
    file: str  # e.g. "train.csv"
    row: int | None  # 1-based data row, None for the whole file
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file} row {self.row}" if self.row else self.file
        return f"{where}: {self.message}. Fix: {self.fix}"


@dataclass
class CheckResult:
    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # {"train": 400, "test": 200}
    class_counts: dict[str, int] = field(default_factory=dict)  # train rows per label, labels.json order
    imbalance_ratio: float | None = None  # max/min count over classes that have rows, e.g. 8.25
    # {"width": {"min": 320, "median": 367, "max": 480}, "height": {...}} over train and test images
    image_sizes: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, row: int | None, message: str, fix: str, *, warning: bool = False) -> None:
        (self.warnings if warning else self.problems).append(Problem(file, row, message, fix))

    def summary(self) -> dict:
        keys = ("rows", "class_counts", "imbalance_ratio", "image_sizes")
        counts = {"problems": len(self.problems), "warnings": len(self.warnings)}
        return {k: getattr(self, k) for k in keys} | counts


@dataclass
class Competition:
    root: Path
    labels: list[str]
    descriptions: dict[str, str]
    train: pd.DataFrame  # id, image (absolute path), label, [reason], [group], other columns as-is
    test: pd.DataFrame  # id, image (absolute path), other columns as-is


def open_image(path: str | Path) -> Image.Image:
    """The image as fully decoded RGB; transparent pixels become white (screenshots saved with alpha)."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file must fail here, not inside a training batch
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DataError(
            f"image not found: {path}. Fix: restore the file or fix its path in the csv"
        ) from None
    except Exception as e:
        raise DataError(
            f"cannot decode image {path}: {type(e).__name__}: {e}. "
            "Fix: re-export the image or drop its row; `exp data check DIR` lists every bad image"
        ) from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _decode(path: str) -> tuple[int, int] | str:
    """(width, height) after a full decode, or the error text."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _read_labels(root: Path, cfg: DataConfig, out: CheckResult) -> dict[str, str] | None:
    name, path = cfg.labels_json, root / cfg.labels_json
    fix = 'write a JSON object {"label": "one-sentence description", ...} in class order'
    if not path.is_file():
        out.add(name, None, f"file not found at {path}", f"{fix}, or set data.labels_json")
        return None

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        for k in {k for k in keys if keys.count(k) > 1}:
            out.add(name, None, f"label '{k}' appears twice", "keep one entry per label")
        return dict(pairs)

    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        out.add(name, None, f"not valid UTF-8 JSON: {e}", fix)
        return None
    if not isinstance(obj, dict) or not obj:
        out.add(name, None, f"expected a non-empty JSON object, got {type(obj).__name__}", fix)
        return None
    bad = [k for k, v in obj.items() if not isinstance(v, str) or not k.strip()]
    for k in bad:
        out.add(name, None, f"label '{k}' has a {type(obj[k]).__name__} description", fix)
    return None if bad else obj


def _read_csv(root: Path, name: str, key: str, need: dict[str, str], limit: int, out: CheckResult):
    """The first `limit` rows (0 = all) as strings ("007" stays "007", "NA" stays "NA"), or None."""
    path = root / name
    if not path.is_file():
        out.add(name, None, f"file not found at {path}", f"add it or set {key}")
        return None
    if path.stat().st_size == 0:
        cols = ",".join(need.values())
        out.add(name, None, "file is empty (0 bytes)", f"write a header '{cols}' and rows")
        return None
    try:
        # utf-8-sig: a csv saved by Excel starts with a BOM that would otherwise rename the first column.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as e:
        out.add(name, None, f"not UTF-8 text ({e.reason})", "re-save the file as UTF-8")
        return None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        line = re.search(r"line (\d+)", str(e))
        row = int(line.group(1)) - 1 if line else None
        msg = str(e).strip().splitlines()[-1]
        out.add(name, row, f"cannot parse: {msg}", "give every line as many fields as the header")
        return None
    for col in {c for c in header if header.count(c) > 1}:
        out.add(name, None, f"column '{col}' appears twice in the header", "rename one")
    missing = [(what, col) for what, col in need.items() if col not in df.columns]
    for what, col in missing:
        near = difflib.get_close_matches(col, list(df.columns), n=1)
        hint = (
            f"rename column '{near[0]}' to '{col}', or set {what}={near[0]}"
            if near
            else f"add it or set {what}"
        )
        have = ", ".join(df.columns) or "none"
        out.add(name, None, f"missing column '{col}' ({what}); columns here: {have}", hint)
    if df.empty and not missing:
        out.add(name, None, "has a header but no rows", "add one row per image")
    return None if missing or df.empty else (df.head(limit) if limit > 0 else df)


def _image_paths(root: Path, df: pd.DataFrame, col: str, name: str, out: CheckResult) -> list[str | None]:
    """Absolute image path per row (None where the path is bad), checking each exists inside `root`."""
    paths: list[str | None] = []
    index: dict[str, list[str]] | None = None
    for row, raw in enumerate(df[col], 1):
        full = os.path.normpath(os.path.join(root, raw))  # lexical: a symlinked images folder stays inside
        if not raw.strip():
            out.add(name, row, f"empty '{col}' cell", "give the image path or drop the row")
        elif os.path.commonpath([full, str(root)]) != str(root):
            msg = f"image path '{raw}' points outside the data folder {root}"
            out.add(name, row, msg, "copy the image into the folder; give its path relative to it")
        elif not os.path.isfile(full):
            if index is None:  # built once, only when some image is missing
                index = {}
                for d, _, files in os.walk(root):
                    for f in files:
                        index.setdefault(f, []).append(os.path.relpath(os.path.join(d, f), root))
            if "\\" in raw:
                fix = f"write the path with forward slashes: {raw.replace(chr(92), '/')}"
            elif raw != raw.strip():
                fix = "remove the spaces around the path"
            elif os.path.basename(raw) in index:
                fix = f"did you mean '{index[os.path.basename(raw)][0]}'? paths are relative to {root}"
            else:
                fix = f"restore the image or fix the path (relative to {root})"
            out.add(name, row, f"image not found: {raw}", fix)
        else:
            paths.append(full)
            continue
        paths.append(None)
    return paths


def _decode_all(
    paths: list[str | None], name: str, out: CheckResult
) -> list[tuple[str, int, tuple[int, int]]]:
    """(file, row, (width, height)) of every image that fully decodes; the others become problems."""
    ok = [(row, p) for row, p in enumerate(paths, 1) if p]
    sizes = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        for (row, _), got in zip(ok, pool.map(_decode, [p for _, p in ok]), strict=True):
            if isinstance(got, str):
                fix = "re-export the image (e.g. open and save it again) or drop the row"
                out.add(name, row, f"cannot decode image: {got}", fix)
            else:
                sizes.append((name, row, got))
    return sizes


def _check_ids(ids: list[str | None], name: str, what: str, out: CheckResult) -> None:
    """Every id present and unique; None marks a row already reported (e.g. its image is missing)."""
    first: dict[str, int] = {}
    for row, value in enumerate(ids, 1):
        if value is None:
            continue
        if not value.strip():
            out.add(name, row, f"empty {what}", f"give every row a unique {what}")
        elif value in first:
            msg = f"duplicate {what} '{value}' (first in row {first[value]})"
            out.add(name, row, msg, f"make every {what} unique or drop the repeated row")
        else:
            first[value] = row


def _inspect(cfg: DataConfig, decode: bool) -> tuple[CheckResult, dict | None, Frame, Frame]:
    """Checks plus what was read: labels.json and the raw train/test frames with an `_abs` image column."""
    root = Path(os.path.normpath(Path(cfg.dir).expanduser().absolute()))  # "a/../b" -> "b" for commonpath
    out = CheckResult(root=root)
    if not root.is_dir():
        out.add(str(root), None, "data folder not found", "pass the competition folder")
        return out, None, None, None
    labels = _read_labels(root, cfg, out)
    need = {"data.image_col": cfg.image_col, "data.label_col": cfg.label_col}
    train = _read_csv(root, cfg.train_csv, "data.train_csv", need, cfg.limit, out)
    need = {"data.id_col": cfg.id_col, "data.image_col": cfg.image_col}
    test = _read_csv(root, cfg.test_csv, "data.test_csv", need, cfg.limit, out)
    sizes: list[tuple[str, int, tuple[int, int]]] = []
    for split, name, df in (("train", cfg.train_csv, train), ("test", cfg.test_csv, test)):
        if df is not None:
            out.rows[split] = len(df)
            # object dtype: a bad row stays None (a str column would turn it into NaN)
            paths = _image_paths(root, df, cfg.image_col, name, out)
            df["_abs"] = pd.Series(paths, index=df.index, dtype=object)
            if decode:
                sizes += _decode_all(paths, name, out)
    if test is not None:
        _check_ids(list(test[cfg.id_col]), cfg.test_csv, f"id ('{cfg.id_col}')", out)
    if train is not None:
        if cfg.id_col in train.columns:
            _check_ids(list(train[cfg.id_col]), cfg.train_csv, f"id ('{cfg.id_col}')", out)
        else:  # ids come from the image paths, so a repeated image would repeat an id
            rel = [os.path.relpath(p, root) if p else None for p in train["_abs"]]
            _check_ids(rel, cfg.train_csv, "image (the row id when there is no id column)", out)
        if labels is not None:
            _check_labels(train[cfg.label_col], labels, cfg.train_csv, out)
        if test is not None:
            _warn_overlap(train, test, cfg, out)
    _summarise(out, sizes, train, labels, cfg)
    order = {cfg.labels_json: 0, cfg.train_csv: 1, cfg.test_csv: 2}
    out.problems.sort(key=lambda p: (order.get(p.file, 3), p.row or 0))  # stable: a row's problems keep order
    return out, labels, train, test


def _check_labels(values: pd.Series, labels: dict[str, str], name: str, out: CheckResult) -> None:
    for row, label in enumerate(values, 1):
        if label in labels:
            continue
        if not label.strip():
            out.add(name, row, "empty label", "give the row a label from labels.json or drop it")
            continue
        near = difflib.get_close_matches(label.strip(), list(labels), n=1, cutoff=0.6)
        fix = f"did you mean '{near[0]}'?" if near else f"use a key of labels.json or add '{label}' to it"
        out.add(name, row, f"label '{label}' is not in labels.json", fix)


def _warn_overlap(train: pd.DataFrame, test: pd.DataFrame, cfg: DataConfig, out: CheckResult) -> None:
    shared = set(train["_abs"].dropna()) & set(test["_abs"].dropna())
    if shared:
        example = os.path.relpath(sorted(shared)[0], out.root)
        msg = f"{len(shared)} test images are also train images, e.g. {example}"
        out.add(cfg.test_csv, None, msg, "check for leakage; CV scores will be optimistic", warning=True)


def _summarise(
    out: CheckResult, sizes: list, train: pd.DataFrame | None, labels: dict | None, cfg: DataConfig
):
    if train is not None:
        counts = train[cfg.label_col].value_counts()
        out.class_counts = {label: int(counts.get(label, 0)) for label in (labels or counts.index)}
        present = [n for n in out.class_counts.values() if n > 0]
        out.imbalance_ratio = round(max(present) / min(present), 2) if present else None
        few = [f"{label} ({n})" for label, n in out.class_counts.items() if n < 5]
        if few:
            msg = f"{len(few)} classes have fewer than 5 training rows: {', '.join(few)}"
            fix = "add examples; with fewer rows than folds, stratified K-fold leaves some folds without them"
            out.add(cfg.train_csv, None, msg, fix, warning=True)
    if sizes:
        for axis, i in (("width", 0), ("height", 1)):
            values = [s[i] for _, _, s in sizes]
            out.image_sizes[axis] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
        lo, hi = GOOD_SIDE
        small = [s for s in sizes if max(s[2]) < lo]
        large = [s for s in sizes if max(s[2]) > hi]
        for bad, word, fix in (
            (small, f"under {lo}", "small text may be unreadable: upscale, or raise image.min_pixels"),
            (large, f"over {hi}", f"they cost many image tokens: set image.longest_side={hi}"),
        ):
            if bad:
                name, row, (w, h) = bad[0]
                msg = f"{len(bad)} images have a longest side {word} px, e.g. {name} row {row} ({w}x{h})"
                out.add(name, row, msg, fix, warning=True)


def check_competition(data_cfg: DataConfig | str | Path) -> CheckResult:
    """Every problem with the competition folder (images fully decoded) plus a summary."""
    return _inspect(_as_cfg(data_cfg), decode=True)[0]


def _as_cfg(data_cfg: DataConfig | str | Path) -> DataConfig:
    """A bare folder means the default file and column names, e.g. `exp data check demo_data`."""
    return data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(dir=str(data_cfg))


def load_competition(data_cfg: DataConfig | str | Path, *, check_images: bool = False) -> Competition:
    """The competition in canonical columns; raises DataError listing every problem.

    Images are checked to exist; `check_images=True` also decodes each one (slower, catches corrupt files).
    """
    data_cfg = _as_cfg(data_cfg)
    out, labels, train, test = _inspect(data_cfg, decode=check_images)
    if out.problems:
        lines = [f"  - {p}" for p in out.problems[:MAX_LISTED]]
        if len(out.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(out.problems) - MAX_LISTED} more: run `exp data check {out.root}`")
        head = f"{len(out.problems)} problem(s) in the competition data at {out.root}:"
        raise DataError("\n".join([head, *lines]), out.problems)
    c = data_cfg
    names = {c.id_col: "id", c.image_col: "image", c.label_col: "label", c.reason_col: "reason"}
    train = _canonical(train, names | {c.group_col: "group"})
    if "id" not in train.columns:  # the image path relative to the folder: stable across runs and machines
        train.insert(0, "id", [Path(os.path.relpath(p, out.root)).as_posix() for p in train["image"]])
    if "group" in train.columns:
        empty = train["group"].str.strip() == ""
        train.loc[empty, "group"] = train.loc[empty, "id"]  # an ungrouped row is a group of its own
    test = _canonical(test, {c.id_col: "id", c.image_col: "image"})
    return Competition(out.root, list(labels), dict(labels), train, test)


def _canonical(df: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """Configured columns renamed to canonical ones; a clashing unconfigured column gets an `orig_` prefix."""
    names = {k: v for k, v in names.items() if k in df.columns}
    clashes = {col: f"orig_{col}" for col in df.columns if col in CANONICAL and col not in names}
    df = df.rename(columns=clashes | names)
    df["image"] = df.pop("_abs")
    first = [col for col in CANONICAL if col in df.columns]
    return df[first + [col for col in df.columns if col not in first]].reset_index(drop=True)


def format_check(result: CheckResult) -> Group:
    """Rich tables for `exp data check`: summary and class counts, then problems and warnings with fixes."""
    summary = Table(title=Text(f"Competition at {result.root}"), show_header=False)
    for split, n in result.rows.items():
        summary.add_row(f"{split} rows", str(n))
    summary.add_row("classes", str(len(result.class_counts)))
    if result.imbalance_ratio is not None:
        summary.add_row("imbalance (max/min)", f"{result.imbalance_ratio:g}")
    for axis, stats in result.image_sizes.items():
        summary.add_row(f"image {axis} min/median/max", "/".join(f"{stats[k]:g}" for k in stats))
    counts = Table(title="Train rows per class")
    counts.add_column("label")
    counts.add_column("rows", justify="right")
    top = max(result.class_counts.values(), default=0) or 1
    for label, n in result.class_counts.items():
        counts.add_row(Text(label), str(n), "#" * round(20 * n / top))  # Text: "[x]" is no markup
    parts: list = [summary, counts]
    for title, items, style in (
        ("Problems", result.problems, "red"),
        ("Warnings", result.warnings, "yellow"),
    ):
        if items:
            table = Table(title=f"{title} ({len(items)})", title_style=style)
            for col in ("file", "row", "problem", "fix"):
                table.add_column(col, overflow="fold")
            for p in items:
                table.add_row(Text(p.file), str(p.row or ""), Text(p.message), Text(p.fix))
            parts.append(table)
    n = len(result.problems)
    verdict = f"[red]{n} problem(s): fix them first[/]" if n else "[green]OK: no problems[/]"
    parts.append(Text.from_markup(verdict))
    return Group(*parts)
