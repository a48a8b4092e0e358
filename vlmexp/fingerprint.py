"""The competition folder's fingerprint: what it holds now, to refuse mixing edited data into a resumed run.

`competition_fingerprint` is stored in a run's provenance and beside its fold assignment;
`fingerprint_changes` tells, file by file, what differs when a later start finds other data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from vlmexp.config import DataConfig
from vlmexp.data import _as_cfg, image_paths


def competition_fingerprint(data_cfg: DataConfig | str | Path) -> dict:
    """What the competition folder holds now, to refuse mixing edited data into a resumed run.

    Tables and labels.json by sha256 of their bytes (a 10,000-row csv hashes in milliseconds), with
    their row counts so a change can be told as "train.csv changed: 10 rows fewer (60 -> 50)".
    Images by size and modification time, not content: hashing 10,000 screenshots (~2 GB) would cost
    tens of seconds on every start, and an edited image changes its mtime. Copying the folder without
    keeping times (`cp -r` without `-p`) therefore reads as every image changed.
    {"digest": "3f9a1c2b7d4e", "files": {"train.csv": {"sha256": ..., "rows": 60}, ...},
     "images": {"images/train_0001.png": "48213:1733011200123456789", ...}}
    """
    cfg = _as_cfg(data_cfg)
    root = Path(os.path.normpath(Path(cfg.dir).expanduser().absolute()))
    files: dict[str, dict] = {}
    images: dict[str, str] = {}
    for name in (cfg.train_csv, cfg.test_csv, cfg.labels_json):
        path = root / name
        if not path.is_file():
            files[name] = {"sha256": "missing", "rows": 0}
            continue
        data = path.read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest()[:16], "rows": None}
        if name == cfg.labels_json:
            continue
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except (ValueError, UnicodeDecodeError):  # unreadable: its checks say why; the bytes still count
            continue
        files[name]["rows"] = len(df)
        for cell in df.get(cfg.image_col, []):
            for rel in image_paths(cell):
                st = (root / rel).stat() if (root / rel).is_file() else None
                images[rel] = f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"
    whole = json.dumps({"files": files, "images": images}, sort_keys=True)
    return {"digest": hashlib.sha256(whole.encode()).hexdigest()[:12], "files": files, "images": images}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one line per file, e.g. "train.csv changed: 10 rows fewer"."""
    if old.get("digest") == new.get("digest"):
        return []
    out = []
    for name in dict.fromkeys([*old.get("files", {}), *new.get("files", {})]):
        a, b = old.get("files", {}).get(name), new.get("files", {}).get(name)
        if a == b:
            continue
        if not a or not b or "missing" in (a["sha256"], b["sha256"]):
            out.append(f"{name} {'appeared' if not a or a['sha256'] == 'missing' else 'is gone'}")
        elif a.get("rows") is not None and b.get("rows") is not None and a["rows"] != b["rows"]:
            n = b["rows"] - a["rows"]
            word = "more" if n > 0 else "fewer"
            out.append(f"{name} changed: {abs(n)} rows {word} ({a['rows']} -> {b['rows']})")
        else:
            out.append(f"{name} changed: same row count, other content")
    a, b = old.get("images", {}), new.get("images", {})
    for what, keys in (
        ("changed", [k for k in a if k in b and a[k] != b[k]]),
        ("added", [k for k in b if k not in a]),
        ("removed", [k for k in a if k not in b]),
    ):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            out.append(f"images {what}: {len(keys)} of {len(a)}, e.g. {', '.join(keys[:3])}{more}")
    return out or ["the data changed (fingerprint differs)"]
