"""Load and check a competition folder: train.csv, test.csv, labels.json and the images.

Every check collects `Problem`s instead of stopping at the first, so one run of
`exp data check DIR` lists every bad row (a missing image in row 3 never hides a bad label in row 9).
Row numbers are 1-based data rows: row 1 is the line right after the header.
This module holds the competition model and its loading; the checks themselves, and the
`exp data check` report, are in `vlmexp.data_check`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from vlmexp import hierarchy
from vlmexp.config import Config, DataConfig

CANONICAL = ("id", "image", "label", "reason", "group")
Frame = pd.DataFrame | None
MAX_LISTED = 100  # problems spelled out in a DataError message; all stay on `.problems`
# A multi-image row holds several paths in its image cell, e.g. "a/front.png|a/back.png".
IMAGE_SEP = "|"


def image_paths(cell: str) -> list[str]:
    """The paths of one image cell, in order: "a/front.png | a/back.png" -> ["a/front.png", "a/back.png"].

    The one place the multi-image convention is spelled out: loading, samples, OCR and reasons split here.
    """
    return [p.strip() for p in str(cell).split(IMAGE_SEP) if p.strip()]


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
    group_col: str | None = None  # the group column found in train.csv, e.g. "group"; None without one
    groups: int | None = None  # distinct groups (a row with an empty cell is a group of its own), e.g. 20
    # A nested labels.json as {parent: [full-path labels]}, e.g. {"上衣": ["上衣/T恤"]}; {} when flat
    tree: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, row: int | None, message: str, fix: str, *, warning: bool = False) -> None:
        (self.warnings if warning else self.problems).append(Problem(file, row, message, fix))

    def summary(self) -> dict:
        keys = ("rows", "class_counts", "imbalance_ratio", "image_sizes", "group_col", "groups", "tree")
        counts = {"problems": len(self.problems), "warnings": len(self.warnings)}
        return {k: getattr(self, k) for k in keys} | counts


@dataclass
class Competition:
    root: Path
    labels: list[str]
    descriptions: dict[str, str]
    train: pd.DataFrame  # id, image (absolute path), label, [reason], [group], other columns as-is
    test: pd.DataFrame  # id, image (absolute path), other columns as-is
    # Two-level labels: {parent: [its full-path labels]} in class order, e.g. {"上衣": ["上衣/T恤"]};
    # {} for a flat competition. `labels` then holds the full paths, which is what trains and scores.
    tree: dict[str, list[str]] = field(default_factory=dict)


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


def _inspect(cfg: DataConfig, decode: bool) -> tuple[CheckResult, dict | None, Frame, Frame]:
    """Checks plus what was read: labels.json and the raw train/test frames with an `_abs` image column."""
    # Imported here: data_check builds on this module's CheckResult and image cells, so a top-level
    # import both ways would be a cycle (as with vlmexp.preflight below).
    from vlmexp.data_check import (
        _check_ids,
        _check_labels,
        _decode_all,
        _image_paths,
        _read_csv,
        _read_labels,
        _suggest_labels,
        _summarise,
        _warn_overlap,
    )

    root = Path(os.path.normpath(Path(cfg.dir).expanduser().absolute()))  # "a/../b" -> "b" for commonpath
    out = CheckResult(root=root)
    if not root.is_dir():
        out.add(str(root), None, "data folder not found", "pass the competition folder")
        return out, None, None, None
    labels = _read_labels(root, cfg, out)
    need = {"data.image_col": cfg.image_col, "data.label_col": cfg.label_col}
    train = _read_csv(root, cfg.train_csv, "data.train_csv", need, _train_limit(cfg), out)
    need = {"data.id_col": cfg.id_col, "data.image_col": cfg.image_col}
    test = _read_csv(root, cfg.test_csv, "data.test_csv", need, cfg.limit, out)
    sizes: dict[str, list[tuple[str, int, tuple[int, int]]]] = {}
    for split, name, df in (("train", cfg.train_csv, train), ("test", cfg.test_csv, test)):
        if df is not None:
            out.rows[split] = len(df)
            # object dtype: a bad row stays None (a str column would turn it into NaN)
            paths = _image_paths(root, df, cfg.image_col, name, out)
            df["_abs"] = pd.Series(paths, index=df.index, dtype=object)
            if decode:
                sizes[name] = _decode_all(paths, name, out)
    if test is not None:
        _check_ids(list(test[cfg.id_col]), cfg.test_csv, f"id ('{cfg.id_col}')", out)
    if train is not None:
        if cfg.id_col in train.columns:
            _check_ids(list(train[cfg.id_col]), cfg.train_csv, f"id ('{cfg.id_col}')", out)
        else:  # ids come from the image paths, so a repeated image would repeat an id
            rel = [_relative_cell(p, root) if p else None for p in train["_abs"]]
            _check_ids(rel, cfg.train_csv, "image (the row id when there is no id column)", out)
        if out.tree and cfg.parent_col in train.columns:
            train[cfg.label_col] = hierarchy.with_parents(train, cfg)
        if labels is not None:
            _check_labels(train[cfg.label_col], labels, cfg.train_csv, out, cfg.hierarchy_sep)
        elif not (root / cfg.labels_json).is_file() and cfg.label_col in train.columns:
            _suggest_labels(train[cfg.label_col], cfg.labels_json, out)
        if test is not None:
            _warn_overlap(train, test, cfg, out)
    _summarise(out, sizes, train, labels, cfg)
    order = {cfg.labels_json: 0, cfg.train_csv: 1, cfg.test_csv: 2}
    out.problems.sort(key=lambda p: (order.get(p.file, 3), p.row or 0))  # stable: a row's problems keep order
    return out, labels, train, test


def _train_limit(cfg: DataConfig) -> int:
    """Rows of train.csv to read: data.train_limit, else data.limit (which also cuts test), 0 = all."""
    return cfg.train_limit or cfg.limit


def _relative_cell(cell: str, root: Path) -> str:
    """An absolute image cell as a row id: "/data/img/a.png|/data/img/b.png" -> "img/a.png|img/b.png"."""
    return IMAGE_SEP.join(Path(os.path.relpath(p, root)).as_posix() for p in image_paths(cell))


def check_competition(data_cfg: DataConfig | str | Path, run_cfg: Config | None = None) -> CheckResult:
    """Every problem with the competition folder (images fully decoded) plus a summary.

    With `run_cfg`, also every other file and column that run would read (see `preflight`).
    """
    out, labels, _, test = _inspect(_as_cfg(data_cfg), decode=True)
    if run_cfg is not None:
        from vlmexp.preflight import check_run_files

        check_run_files(run_cfg, out, labels, test)
    return out


def preflight(cfg: Config) -> Competition:
    """The competition a run trains on, after checking everything it will read, before fold 0.

    Every image of the rows it uses is fully decoded, and every other file of the config (answers,
    mix dataset, OCR cache folder, source runs) is checked; all problems are raised at once, e.g.
    a corrupt image in row 5, another in row 8 and a missing answers file in one DataError.
    """
    from vlmexp.preflight import check_run_files

    out, labels, train, test = _inspect(cfg.data, decode=True)
    check_run_files(cfg, out, labels, test)
    _raise_problems(out)
    return _competition(cfg.data, out.root, labels, train, test, out.tree)


def _as_cfg(data_cfg: DataConfig | str | Path) -> DataConfig:
    """A bare folder means the default file and column names, e.g. `exp data check demo_data`."""
    return data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(dir=str(data_cfg))


def load_competition(data_cfg: DataConfig | str | Path, *, check_images: bool = False) -> Competition:
    """The competition in canonical columns; raises DataError listing every problem.

    Images are checked to exist; `check_images=True` also decodes each one (slower, catches corrupt files).
    """
    data_cfg = _as_cfg(data_cfg)
    out, labels, train, test = _inspect(data_cfg, decode=check_images)
    _raise_problems(out)
    return _competition(data_cfg, out.root, labels, train, test, out.tree)


def _raise_problems(out: CheckResult) -> None:
    if out.problems:
        lines = [f"  - {p}" for p in out.problems[:MAX_LISTED]]
        if len(out.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(out.problems) - MAX_LISTED} more: run `exp data check {out.root}`")
        head = f"{len(out.problems)} problem(s) in the competition data at {out.root}:"
        raise DataError("\n".join([head, *lines]), out.problems)


def _competition(
    c: DataConfig, root: Path, labels, train: pd.DataFrame, test: pd.DataFrame, tree: dict[str, list[str]]
) -> Competition:
    """Checked frames -> canonical columns (id, image, label, reason, group, then the rest as-is)."""
    names = {c.id_col: "id", c.image_col: "image", c.label_col: "label", c.reason_col: "reason"}
    train = _canonical(train, names | {c.group_col: "group"})
    if "id" not in train.columns:  # the image path relative to the folder: stable across runs and machines
        train.insert(0, "id", [_relative_cell(p, root) for p in train["image"]])
    if "group" in train.columns:
        empty = train["group"].str.strip() == ""
        train.loc[empty, "group"] = train.loc[empty, "id"]  # an ungrouped row is a group of its own
    test = _canonical(test, {c.id_col: "id", c.image_col: "image"})
    return Competition(root, list(labels), dict(labels), train, test, tree)


def read_answers(data_cfg: DataConfig) -> pd.Series:
    """data.answers_csv as {test id: label}, plain strings (an answer "None" or "NA" stays that label)."""
    path = Path(data_cfg.dir) / data_cfg.answers_csv
    df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    return df.set_index(data_cfg.id_col)[data_cfg.label_col]


def _canonical(df: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """Configured columns renamed to canonical ones; a clashing unconfigured column gets an `orig_` prefix."""
    names = {k: v for k, v in names.items() if k in df.columns}
    clashes = {col: f"orig_{col}" for col in df.columns if col in CANONICAL and col not in names}
    df = df.rename(columns=clashes | names)
    df["image"] = df.pop("_abs")
    first = [col for col in CANONICAL if col in df.columns]
    return df[first + [col for col in df.columns if col not in first]].reset_index(drop=True)
