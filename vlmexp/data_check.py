"""The checks behind `exp data check` and every load: labels.json, the csvs, image paths, ids, labels.

Each helper adds what is wrong to a `CheckResult` as a `Problem` (or warning) with its fix instead of
raising, so `data._inspect` runs them all and one `exp data check DIR` lists every bad row
(`vlmexp.preflight` reuses `_read_csv` and `_check_labels` for the answers file); `_summarise` fills the
counts and image sizes and `format_check` renders the report. The model it fills lives in `vlmexp.data`,
which imports this module only inside `_inspect`, so neither imports the other at load time in a cycle.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from rich.console import Group
from rich.table import Table
from rich.text import Text

from vlmexp import hierarchy
from vlmexp.config import DataConfig
from vlmexp.data import IMAGE_SEP, CheckResult, image_paths

GOOD_SIDE = (300, 1000)  # longest side in px; smaller loses screenshot text, larger costs image tokens


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
    if any(isinstance(v, dict) for v in obj.values()):
        obj = hierarchy.flatten(obj, name, cfg.hierarchy_sep, out)
        if obj is None:
            return None
    if len(obj) < 2:
        # One class scores a perfect CV of 1.0 +- 0.0 and teaches nothing.
        msg = f"has {len(obj)} class ({', '.join(obj)}); classification needs at least 2 classes"
        out.add(name, None, msg, "add the other classes to labels.json (and their rows to train.csv)")
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
    """Absolute image cell per row (None where a path is bad), checking each image exists inside `root`.

    A multi-image cell stays one cell of absolute paths: "a.png|b.png" -> "/data/a.png|/data/b.png".
    """
    cells: list[str | None] = []
    index: dict[str, list[str]] = {}
    for row, raw in enumerate(df[col], 1):
        if not raw.strip():
            out.add(name, row, f"empty '{col}' cell", "give the image path or drop the row")
            cells.append(None)
            continue
        parts = [_image_path(root, part, name, row, out, index) for part in raw.split(IMAGE_SEP)]
        cells.append(IMAGE_SEP.join(parts) if all(parts) else None)  # type: ignore[arg-type]
    return cells


def _image_path(root: Path, raw: str, name: str, row: int, out: CheckResult, index: dict) -> str | None:
    """One image's absolute path, or None after adding the problem; `index` is filled on the first miss."""
    path = raw.strip()  # "a.png | b.png": spaces around a multi-image separator are no part of a path
    full = os.path.normpath(os.path.join(root, path))  # lexical: a symlinked images folder stays inside
    if not path:
        out.add(name, row, "empty path in a multi-image cell", f"remove the extra '{IMAGE_SEP}'")
    elif os.path.commonpath([full, str(root)]) != str(root):
        msg = f"image path '{path}' points outside the data folder {root}"
        out.add(name, row, msg, "copy the image into the folder; give its path relative to it")
    elif not os.path.isfile(full):
        if not index:  # built once, only when some image is missing
            for d, _, files in os.walk(root):
                for f in files:
                    index.setdefault(f, []).append(os.path.relpath(os.path.join(d, f), root))
        if "\\" in path:
            fix = f"write the path with forward slashes: {path.replace(chr(92), '/')}"
        elif os.path.basename(path) in index:
            fix = f"did you mean '{index[os.path.basename(path)][0]}'? paths are relative to {root}"
        else:
            fix = f"restore the image or fix the path (relative to {root})"
        out.add(name, row, f"image not found: {path}", fix)
    else:
        return full
    return None


def _decode_all(
    paths: list[str | None], name: str, out: CheckResult
) -> list[tuple[str, int, tuple[int, int]]]:
    """(file, row, (width, height)) of every image that fully decodes; the others become problems."""
    ok = [(row, p) for row, cell in enumerate(paths, 1) if cell for p in image_paths(cell)]
    sizes = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        for (row, path), got in zip(ok, pool.map(_decode, [p for _, p in ok]), strict=True):
            if isinstance(got, str):
                fix = "re-export the image (e.g. open and save it again) or drop the row"
                # PIL's limit is twice 89 MP (e.g. 14000 x 14000): saving the file again cannot help
                if got.startswith("DecompressionBombError"):
                    fix = "resize it (e.g. to 4096 px on its longest side) or drop its row"
                out.add(name, row, f"cannot decode image {os.path.relpath(path, out.root)}: {got}", fix)
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


def _check_labels(values: pd.Series, labels: dict[str, str], name: str, out: CheckResult, sep: str) -> None:
    paths = hierarchy.paths_of_children(out.tree, sep)  # {"T恤": ["上衣/T恤"]}; {} for flat labels
    for row, label in enumerate(values, 1):
        if label in labels:
            continue
        if not label.strip():
            out.add(name, row, "empty label", "give the row a label from labels.json or drop it")
            continue
        if label.strip() in paths:
            fix = f"write the full path parent{sep}child: {' or '.join(paths[label.strip()])}"
            out.add(name, row, f"label '{label}' is a child name without its parent", fix)
            continue
        near = difflib.get_close_matches(label.strip(), list(labels), n=1, cutoff=0.6)
        fix = f"did you mean '{near[0]}'?" if near else f"use a key of labels.json or add '{label}' to it"
        out.add(name, row, f"label '{label}' is not in labels.json", fix)


def _suggest_labels(values: pd.Series, name: str, out: CheckResult) -> None:
    """A missing labels.json's fix, written from train.csv's own labels (first-seen order), e.g.
    'write /data/labels.json: {"类别1": "", "NA": ""} (...)', so the user fills in the descriptions."""
    seen = list(dict.fromkeys(v for v in values if v.strip()))
    if not seen:
        return
    shown = json.dumps({k: "" for k in seen[:30]}, ensure_ascii=False)
    more = f" and {len(seen) - 30} more" if len(seen) > 30 else ""
    for p in out.problems:
        if p.file == name and p.message.startswith("file not found"):
            p.fix = (
                f"write {out.root / name}: {shown}{more} ({len(seen)} labels of train.csv in first-seen "
                "order, the class order; a one-sentence description each helps prompt=label_desc), "
                "or set data.labels_json"
            )


def _warn_overlap(train: pd.DataFrame, test: pd.DataFrame, cfg: DataConfig, out: CheckResult) -> None:
    shared = set(train["_abs"].dropna()) & set(test["_abs"].dropna())
    if shared:
        example = os.path.relpath(sorted(shared)[0], out.root)
        msg = f"{len(shared)} test images are also train images, e.g. {example}"
        out.add(cfg.test_csv, None, msg, "check for leakage; CV scores will be optimistic", warning=True)


def _summarise(
    out: CheckResult, sizes: dict[str, list], train: pd.DataFrame | None, labels: dict | None, cfg: DataConfig
):
    if train is not None and cfg.group_col in train.columns:
        cells = train[cfg.group_col].str.strip()
        out.group_col = cfg.group_col
        out.groups = cells[cells != ""].nunique() + int((cells == "").sum())  # an empty cell: its own group
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
    every = [s for per_file in sizes.values() for s in per_file]
    if every:
        for axis, i in (("width", 0), ("height", 1)):
            values = [s[i] for _, _, s in every]
            out.image_sizes[axis] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
    lo, hi = GOOD_SIDE
    for per_file in sizes.values():  # one warning per file: its count is that file's images only
        small = [s for s in per_file if max(s[2]) < lo]
        large = [s for s in per_file if max(s[2]) > hi]
        for bad, word, fix in (
            (small, f"under {lo}", "small text may be unreadable: upscale, or raise image.min_pixels"),
            (large, f"over {hi}", f"they cost many image tokens: set image.longest_side={hi}"),
        ):
            if bad:
                name, row, (w, h) = bad[0]
                msg = f"{len(bad)} images have a longest side {word} px, e.g. {name} row {row} ({w}x{h})"
                out.add(name, row, msg, fix, warning=True)


def format_check(result: CheckResult) -> Group:
    """Rich tables for `exp data check`: summary and class counts, then problems and warnings with fixes."""
    summary = Table(title=Text(f"Competition at {result.root}"), show_header=False)
    for split, n in result.rows.items():
        summary.add_row(f"{split} rows", str(n))
    summary.add_row("classes", str(len(result.class_counts)))
    if result.group_col:  # grouped folds: rows of one group never straddle train and validation
        summary.add_row(Text(f"group column '{result.group_col}'"), f"{result.groups} groups")
    if result.tree:  # nested labels.json: the classes are full paths, e.g. "上衣/T恤"
        summary.add_row("hierarchy", f"{len(result.tree)} parents of {len(result.class_counts)} classes")
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
