"""The OCR cache: one small JSON file per image, named by the sha256 of the image's bytes.

Keyed by content, not path, so the same screenshot copied into train/ and test/ (or a data folder
moved elsewhere) is read once. Each file is written atomically as its image finishes, so a run
killed halfway keeps everything read so far and the next call reads only what is missing.

A record holds every line the reader found with its box and confidence, unfiltered:
`ocr.min_confidence` is applied when the text is assembled, so changing it needs no new OCR.
A record whose `settings` differ from the reader's current ones (other detector settings, another
rapidocr version) counts as missing and is read again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vlmexp.tables import read_json, write_json

_CHUNK = 1 << 20  # hash in 1 MiB pieces: a 20 MB scan never sits in memory twice


def file_hash(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes, e.g. "9f86d081...". Raises FileNotFoundError with the path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / f"{digest}.json"


def load_record(cache_dir: str | Path, digest: str, settings: dict) -> dict | None:
    """The cached record of an image, or None when absent, unreadable or made with other settings."""
    path = cache_path(cache_dir, digest)
    try:
        record = read_json(path)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        # Writes are atomic, so this is a file damaged from outside; reading the image again repairs it.
        return None
    if not isinstance(record, dict) or record.get("settings") != settings or "lines" not in record:
        return None
    return record


def save_record(cache_dir: str | Path, digest: str, record: dict) -> Path:
    return write_json(record, cache_path(cache_dir, digest))
