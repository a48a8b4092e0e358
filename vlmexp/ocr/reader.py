"""Reading images with rapidocr-onnxruntime, in parallel, and turning its boxes into text.

Settings, measured on 400x300 rendered screenshots (2 cores): the defaults upscale every image so
its short side is 736 px (~0.5 s/image) and glue English words together ("Refundrequest");
`det_limit_type="max", det_limit_side_len=960` keeps small images at their own size (~0.19 s/image)
and kept the spaces (text similarity 0.994 vs 0.963). `use_cls=False` skips the 180-degree text
classifier: screenshots are upright. Chinese ("退款页面") reads at ~0.999 confidence either way.

Parallelism: one process per core, each with its own RapidOCR limited to one onnxruntime thread
(two processes x two threads would oversubscribe two cores). Workers are spawned, not forked:
a fork after onnxruntime has started its thread pool in the parent hangs (seen here).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

# Everything here changes what the reader returns; it is stored with each cached record.
READER_SETTINGS = {"det_limit_type": "max", "det_limit_side_len": 960, "use_cls": False}
# Keep every line the recogniser produces; `ocr.min_confidence` filters when text is assembled.
_TEXT_SCORE = 0.0
# Boxes whose vertical centres differ by less than this share of the smaller box height share a line:
# "Total:" and "59.90" on one row sit within a few px; the next row is >= one line height away.
_SAME_LINE = 0.5


class OcrError(RuntimeError):
    """An image could not be read; the message names it and says how to fix it."""


def settings() -> dict:
    """What a cached record must have been made with to be reused, e.g. {..., "rapidocr": "1.4.4"}."""
    return READER_SETTINGS | {"text_score": _TEXT_SCORE, "rapidocr": _rapidocr_version()}


@functools.cache
def _rapidocr_version() -> str:
    """rapidocr-onnxruntime's version, once it is known to import in this process: a broken install
    otherwise surfaced as a traceback, or as "an OCR worker process died" from the worker pool."""
    try:
        found = version("rapidocr-onnxruntime")
        import rapidocr_onnxruntime  # noqa: F401  (onnxruntime + cv2: ~0.5 s, once per process)
    except (PackageNotFoundError, ImportError) as e:
        raise OcrError(
            f"ocr.enabled=true needs rapidocr-onnxruntime, which cannot be loaded ({type(e).__name__}: {e}); "
            "fix: pip install rapidocr-onnxruntime (a vlmexp dependency, so pip install -e . brings it), "
            "or set ocr.enabled=false"
        ) from None
    return found


def make_engine(threads: int = 1):
    from rapidocr_onnxruntime import RapidOCR  # here: onnxruntime + cv2 cost ~0.5 s to import

    return RapidOCR(
        text_score=_TEXT_SCORE, intra_op_num_threads=threads, inter_op_num_threads=1, **READER_SETTINGS
    )


def read_image(engine, path: str) -> dict:
    """{"lines": [{"text", "conf", "box"}...], "seconds"} for one image, lines unfiltered and unordered."""
    from vlmexp.data import open_image  # RGB with transparency on white, EXIF rotation applied

    start = time.perf_counter()
    # A PIL image, not the path: rapidocr would read palette PNGs as raw indices and invert RGBA ones.
    result, _ = engine(open_image(path))
    lines = [
        {
            "text": str(text).strip(),
            "conf": round(float(conf), 4),
            "box": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
        }
        for box, text, conf in result or []
        if str(text).strip()
    ]
    return {"lines": lines, "seconds": round(time.perf_counter() - start, 3)}


def _centre_y(line: dict) -> float:
    return sum(y for _, y in line["box"]) / 4


def _height(line: dict) -> float:
    ys = [y for _, y in line["box"]]
    return max(ys) - min(ys)


def reading_order(lines: list[dict]) -> list[list[dict]]:
    """Boxes grouped into text lines, top to bottom, each line's boxes left to right."""
    rows: list[list[dict]] = []
    for line in sorted(lines, key=_centre_y):
        if rows:
            row = rows[-1]
            row_y = statistics.fmean(_centre_y(b) for b in row)
            row_h = statistics.median(_height(b) for b in row)
            if abs(_centre_y(line) - row_y) < _SAME_LINE * min(_height(line), row_h):
                row.append(line)
                continue
        rows.append([line])
    return [sorted(row, key=lambda b: min(x for x, _ in b["box"])) for row in rows]


def assemble(lines: list[dict], min_confidence: float) -> str:
    """The text of the kept boxes in reading order: boxes of a line joined by " ", lines by newlines."""
    kept = [b for b in lines if b["conf"] >= min_confidence]
    return "\n".join(" ".join(b["text"] for b in row) for row in reading_order(kept))


# -- parallel reading -----------------------------------------------------------------------------
# Fewer missing images than this are read in this process: a spawned worker costs ~1.5 s to start
# (imports + models), which 2 workers at ~0.2 s/image only win back after about 15 images.
POOL_MIN = 16
_ENGINE = None  # one per process: in a worker, or in the caller for the in-process path
_ENGINE_THREADS = 0


def _engine(threads: int):
    global _ENGINE, _ENGINE_THREADS
    if _ENGINE is None or _ENGINE_THREADS != threads:
        _ENGINE, _ENGINE_THREADS = make_engine(threads), threads
    return _ENGINE


def _init_worker() -> None:
    _engine(1)


def _read_in_worker(path: str) -> dict:
    return read_image(_engine(1), path)


def _failed(path: str, err: BaseException) -> OcrError:
    if isinstance(err, BrokenProcessPool):
        return OcrError(
            f"an OCR worker process died while reading {path} (out of memory or killed?). "
            "Images read before it are cached; rerun, or pass workers=1 to read in this process"
        )
    return OcrError(
        f"OCR failed on {path}: {type(err).__name__}: {str(err).rstrip('.')}. Images read before it "
        "are cached; fix or re-export the image (or drop its row) and rerun"
    )


def _can_spawn() -> bool:
    """False when a spawned worker could not re-import the main script, e.g. code piped via stdin."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.isfile(main_file)


def read_images(todo: dict[str, str], workers: int = 0) -> Iterator[tuple[str, dict]]:
    """Yield (key, record) for each {key: image path} in `todo` as it finishes, in any order.

    workers=0 means one per core. One worker, or fewer than `POOL_MIN` images, read in this process
    with `workers` onnxruntime threads; otherwise a process pool reads them.
    """
    n = min(workers or os.cpu_count() or 1, len(todo))
    if n <= 1 or len(todo) < POOL_MIN or not _can_spawn():
        engine = _engine(max(1, workers or os.cpu_count() or 1))
        for key, path in todo.items():
            try:
                record = read_image(engine, path)
            except Exception as e:
                raise _failed(path, e) from e
            yield key, record
        return
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        pending: dict[Future, str] = {pool.submit(_read_in_worker, p): key for key, p in todo.items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                key = pending.pop(fut)
                try:
                    record = fut.result()
                except Exception as e:
                    raise _failed(todo[key], e) from e
                yield key, record
    finally:
        # On an error or Ctrl-C: drop queued images, wait only for the few already being read.
        pool.shutdown(wait=True, cancel_futures=True)
