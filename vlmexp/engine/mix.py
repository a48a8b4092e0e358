"""`train.mix_dataset`: general chat samples mixed into a fold's training rows (`train.mix_ratio`), the
usual guard against a small fine-tune forgetting how to follow instructions, e.g. 0.1 x 800 rows = 80
lines of a JSONL file added to each fold, picked by the run's seed."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from vlmexp.config import Config
from vlmexp.engine.samples import load_images


def mix_samples(cfg: Config, n_competition: int) -> list[dict]:
    """`round(mix_ratio * n)` general chat samples from `train.mix_dataset`, chosen by `seed`.

    The file is JSONL, one {"messages": [...], "images": ["a.png", ...]} per line (images optional,
    relative to the file's folder); the final assistant message is what is learned.
    """
    path = Path(cfg.train.mix_dataset)
    if not path.is_file():
        raise FileNotFoundError(f"train.mix_dataset={path}: no such file (JSONL of {{'messages': [...]}})")
    pool = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not pool:
        raise ValueError(f"train.mix_dataset={path} is empty")
    n = round(cfg.train.mix_ratio * n_competition)
    rng = random.Random(cfg.seed)
    # Without replacement while the pool lasts, then whole extra passes over it.
    picks = [i for _ in range(math.ceil(n / len(pool))) for i in rng.sample(range(len(pool)), len(pool))][:n]
    return [_mix_sample(pool[i], i, path, cfg) for i in picks]


def _mix_sample(record: dict, line: int, path: Path, cfg: Config) -> dict:
    messages = record.get("messages")
    where = f"{path} line {line + 1}"
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: needs 'messages' ending with an assistant message")
    paths = [str(p if Path(p).is_absolute() else path.parent / p) for p in record.get("images") or []]
    images = [img for p in paths for img in load_images(p, cfg)]
    return {"id": f"mix:{line}", "images": images, "messages": _structured(messages, len(images), where)}


def _structured(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """String contents -> [{"type": "text"}] parts; images go before the first user text if unplaced."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        out.append({"role": m["role"], "content": parts})
    placed = sum(p.get("type") == "image" for m in out for p in m["content"])
    if placed == 0 and n_images:
        first_user = next(m for m in out if m["role"] == "user")
        first_user["content"] = [{"type": "image"}] * n_images + first_user["content"]
    elif placed != n_images:
        raise ValueError(f"{where}: {placed} image slots in the messages but {n_images} images listed")
    return out
