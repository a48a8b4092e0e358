"""OCR text of the competition images, read once per image content and cached.

    texts = ocr_text_for(comp.train["image"].tolist(), cfg.ocr)   # {image cell: text <= max_chars}

`ocr_images` reads the cache (`ocr.cache_dir`, one JSON per image hash), reads only the missing
images on all cores, and returns each image's text in reading order, lines below
`ocr.min_confidence` dropped. `exp ocr DATA` fills the cache for a whole competition up front.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vlmexp.config import DataConfig, OcrConfig
from vlmexp.ocr.cache import file_hash, load_record, save_record
from vlmexp.ocr.reader import OcrError, assemble, read_images, reading_order, settings

__all__ = [
    "OcrError",
    "OcrStats",
    "assemble",
    "cut_text",
    "ocr_images",
    "ocr_records",
    "ocr_text_for",
    "reading_order",
    "run_ocr_on_competition",
]
log = logging.getLogger(__name__)


@dataclass
class OcrStats:
    images: int  # paths asked for
    unique: int  # distinct image contents among them
    cached: int  # contents found in the cache
    read: int  # contents OCR'd by this call
    seconds: float


def _hash_all(paths: list[str]) -> dict[str, str]:
    """{path: sha256}; threads, because hashlib releases the GIL and network disks are slow."""
    unique = list(dict.fromkeys(paths))
    try:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return dict(zip(unique, pool.map(file_hash, unique), strict=True))
    except (FileNotFoundError, IsADirectoryError) as e:
        raise OcrError(f"cannot OCR {e.filename}: no such image file. Fix its path in the csv") from None


def _progress(total: int, show: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]OCR"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show or not console.is_terminal,
    )


def ocr_records(
    paths: list[str], ocr_cfg: OcrConfig, workers: int = 0, progress: bool = True
) -> tuple[dict[str, dict], OcrStats]:
    """{path: cached record} for every path (reading the missing ones) and what it took."""
    start = time.perf_counter()
    paths = [str(p) for p in paths]
    digests = _hash_all(paths)
    want = settings()
    records: dict[str, dict] = {}
    todo: dict[str, str] = {}  # digest -> the first path with that content
    for path, digest in digests.items():
        if digest in records or digest in todo:
            continue
        record = load_record(ocr_cfg.cache_dir, digest, want)
        if record is None:
            todo[digest] = path
        else:
            records[digest] = record
    cached = len(records)
    if todo:
        log.info("OCR: %d image(s) to read, %d cached, in %s", len(todo), cached, ocr_cfg.cache_dir)
        with _progress(len(todo), progress) as bar:
            task = bar.add_task("ocr", total=len(todo))
            for digest, got in read_images(todo, workers):
                got["text"] = assemble(got["lines"], 0.0)  # for a person opening the file
                record = {
                    "text": got["text"],
                    "lines": got["lines"],
                    "settings": want,
                    "source": todo[digest],
                    "seconds": got["seconds"],
                }
                save_record(ocr_cfg.cache_dir, digest, record)  # now, so a crash keeps it
                records[digest] = record
                bar.advance(task)
    stats = OcrStats(len(paths), len(records), cached, len(todo), round(time.perf_counter() - start, 2))
    return {p: records[digests[p]] for p in paths}, stats


def ocr_images(
    paths: list[str], ocr_cfg: OcrConfig, workers: int = 0, progress: bool = True
) -> dict[str, str]:
    """{path: text} in reading order, lines below `ocr_cfg.min_confidence` dropped ("" for no text)."""
    records, _ = ocr_records(paths, ocr_cfg, workers, progress)
    return {p: assemble(r["lines"], ocr_cfg.min_confidence) for p, r in records.items()}


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` (<= 0: uncut), at a line end when that keeps at least half the budget.

    E.g. a 700-char text with a line ending at 580 is cut to 580 chars, not mid-word at 600.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]  # +1: a newline right after the budget is a clean cut too
    for sep in ("\n", " "):
        at = head.rfind(sep)
        if at >= max_chars // 2:
            return head[:at].rstrip()
    return text[:max_chars]


def _image_paths(cell: str) -> list[str]:
    from vlmexp.data import image_paths  # a multi-image cell: "a/front.png|a/back.png"

    return image_paths(cell)


def ocr_text_for(
    paths: list[str], ocr_cfg: OcrConfig, workers: int = 0, progress: bool = True
) -> dict[str, str]:
    """{image cell: OCR text cut to `ocr_cfg.max_chars`}; what a run puts into its prompts.

    A multi-image cell gets its images' texts joined by newlines before the cut.
    """
    cells = [str(c) for c in dict.fromkeys(paths)]
    parts = {c: _image_paths(c) for c in cells}
    texts = ocr_images([p for ps in parts.values() for p in ps], ocr_cfg, workers, progress)
    return {
        c: cut_text("\n".join(t for p in ps if (t := texts[p])), ocr_cfg.max_chars) for c, ps in parts.items()
    }


def run_ocr_on_competition(data_cfg: DataConfig, ocr_cfg: OcrConfig, workers: int = 0) -> dict:
    """`exp ocr DATA`: fill the cache for every train and test image; returns counts and timing."""
    from vlmexp.data import load_competition

    comp = load_competition(data_cfg)
    cells = comp.train["image"].tolist() + comp.test["image"].tolist()
    paths = [p for c in cells for p in _image_paths(c)]
    records, stats = ocr_records(paths, ocr_cfg, workers, progress=True)
    no_text = sum(1 for r in records.values() if not assemble(r["lines"], ocr_cfg.min_confidence))
    return asdict(stats) | {"no_text": no_text, "cache_dir": str(Path(ocr_cfg.cache_dir).resolve())}
