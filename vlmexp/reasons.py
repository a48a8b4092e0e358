"""Teacher-written reasons for reason-then-label prompts, through any OpenAI-compatible chat API.

    reasons = write_reasons(comp.train, comp.labels, comp.descriptions,
                            base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-72B-Instruct",
                            out_jsonl=Path("reasons.jsonl"))

The teacher sees each training image and its gold label and writes one or two sentences of visible
evidence ("The page shows a refund amount, a reason field and a Submit refund button."). Test rows
have no gold label and are refused: a reason written from a guessed label would leak mistakes.

Every finished reason is appended to `out_jsonl` at once (flushed and fsynced), keyed by the image
bytes' sha256 and the sha256 of the prompt text + model, so an interrupted run asks only for what
is missing, and a changed prompt, label or model asks again. The client, its retries, the API key
(from the environment) and the redaction that keeps the key out of the JSONL, logs and error
messages are `vlmexp.openai_client`'s, shared with `predict.backend=openai`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import pandas as pd

from vlmexp.config import DataConfig
from vlmexp.ocr.cache import file_hash
from vlmexp.openai_client import ServerError, chat, data_url, make_client, redact
from vlmexp.tables import write_table

log = logging.getLogger(__name__)

# {label}, {description} and {classes} ("- label: description" per class) are filled in by plain
# replacement, so a prompt may contain other braces, e.g. a JSON example.
DEFAULT_PROMPT = (
    "This image belongs to one of these classes:\n{classes}\n\n"
    "The correct label is {label} ({description}). In one or two sentences, explain what visible "
    "evidence in the image supports it (text, layout, objects, colours), without naming the label."
)
_FATAL = {401, 403, 404}  # wrong key, no access, wrong model or URL: every other row would fail too


class ReasonsError(RuntimeError):
    """Reasons could not be written; the message says which rows and how to fix it."""


class _FatalReply(ReasonsError):
    """An answer that every other row would get too (401, 403, 404): stop asking."""


def _check_train(train: pd.DataFrame, labels: list[str]) -> None:
    if "label" not in train.columns:
        raise ReasonsError(
            "write_reasons got a table without a 'label' column, which looks like test data. Reasons are "
            "written for train rows only (the gold label goes into the prompt); pass comp.train"
        )
    missing = [c for c in ("id", "image") if c not in train.columns]
    if missing:
        raise ReasonsError(f"write_reasons needs columns id, image, label; missing {missing}")
    unknown = sorted({str(x) for x in train["label"] if x not in labels})
    if unknown:
        raise ReasonsError(f"labels not in labels.json: {unknown[:10]}; fix train.csv or labels.json")


def render_prompt(template: str, label: str, labels: list[str], descriptions: dict[str, str]) -> str:
    classes = "\n".join(f"- {x}: {descriptions.get(x, '')}".rstrip(": ") for x in labels)
    return (
        template.replace("{classes}", classes)
        .replace("{description}", descriptions.get(label, ""))
        .replace("{label}", label)
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _image_cell_paths(cell: str) -> list[str]:
    from vlmexp.data import image_paths  # a multi-image cell: "a/front.png|a/back.png"

    return image_paths(cell)


def read_cache(path: Path) -> dict[str, dict]:
    """{key: entry} of a reasons JSONL; a line cut short by a kill mid-write is skipped."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            out[entry["key"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += line.strip() != ""
    if bad:
        log.warning("%s: skipped %d unreadable line(s), e.g. one cut short by a kill", path, bad)
    return out


class _Appender:
    """Appends one JSON line per finished reason and syncs it to disk before going on."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self.f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if needs_newline:  # a line cut short by a kill: end it so the next entry starts clean
            self.f.write("\n")

    def write(self, entry: dict) -> None:
        self.f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class _Teacher:
    """One chat request per row; the openai client retries 429, 5xx and lost connections itself."""

    def __init__(self, client, model, *, max_tokens, temperature):
        self.client, self.model = client, model
        self.max_tokens, self.temperature = max_tokens, temperature
        self.lock = threading.Lock()
        # Set on a fatal reply, so rows already queued in the pool return without asking.
        self.stop = threading.Event()
        self.fatal = ""  # the first fatal reply, e.g. "row r0: http://.../v1 refused ...: (HTTP 401) ..."

    def __call__(self, row_id: str, prompt: str, paths: list[str]) -> str:
        if self.stop.is_set():
            raise _FatalReply("not asked: an earlier request got a fatal reply")
        content = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in paths]
        kwargs = {"model": self.model, "messages": [{"role": "user", "content": content}]}
        kwargs |= {"max_tokens": self.max_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        try:
            reply = chat(self.client, **kwargs)
        except ServerError as e:  # already redacted, and already retried where retrying helps
            if e.status in _FATAL:
                with self.lock:
                    self.fatal = self.fatal or f"row {row_id}: {e}"
                self.stop.set()
                raise _FatalReply(self.fatal) from None
            raise ReasonsError(str(e)) from None
        text = " ".join((reply.choices[0].message.content or "").split())
        if not text:  # one line: a reason lands in a csv cell and in a prompt
            raise ReasonsError(redact(f"the teacher returned an empty reply: {str(reply)[:200]}"))
        return text


def write_reasons(
    train: pd.DataFrame,
    labels: list[str],
    descriptions: dict[str, str],
    *,
    base_url: str,
    model: str,
    out_jsonl: Path,
    api_key_env: str = "OPENAI_API_KEY",
    concurrency: int = 8,
    max_retries: int = 5,
    prompt: str | None = None,
    progress: bool = True,
    timeout_s: float = 120.0,
    max_tokens: int = 200,
    temperature: float | None = None,
) -> pd.DataFrame:
    """DataFrame(id, reason) for every train row, asking the teacher only for rows not in `out_jsonl`.

    `prompt` may use {label}, {description} and {classes}; it must use {label}. Rows that still fail
    after the openai client's `max_retries` retries (429, 5xx, lost connections) raise ReasonsError
    at the end, after every other row is saved.
    `df.attrs["stats"]` holds {"rows", "cached", "asked", "seconds"}.
    """
    from rich.console import Console
    from rich.progress import Progress

    _check_train(train, labels)
    template = prompt or DEFAULT_PROMPT
    if "{label}" not in template:
        raise ReasonsError("the reasons prompt must contain {label}: the teacher explains the gold label")
    start = time.perf_counter()
    out_jsonl = Path(out_jsonl)
    client = make_client(base_url, api_key_env=api_key_env, timeout=timeout_s, max_retries=max_retries)
    teacher = _Teacher(client, model, max_tokens=max_tokens, temperature=temperature)

    cache = read_cache(out_jsonl)
    rows: list[dict] = []
    for row in train.to_dict(orient="records"):
        paths = _image_cell_paths(row["image"])
        text = render_prompt(template, str(row["label"]), labels, descriptions)
        image_sha = _sha("|".join(file_hash(p) for p in paths)) if len(paths) > 1 else file_hash(paths[0])
        prompt_sha = _sha(text + "\0" + model)
        rows.append(
            {
                "id": str(row["id"]),
                "label": str(row["label"]),
                "paths": paths,
                "prompt": text,
                "image_sha256": image_sha,
                "prompt_sha256": prompt_sha,
                "key": f"{image_sha}:{prompt_sha}",
            }
        )
    todo = list({r["key"]: r for r in rows if r["key"] not in cache}.values())  # same image+prompt: ask once
    log.info(
        "reasons: %d rows, %d cached, %d to ask %s at %s",
        len(rows),
        len(rows) - len(todo),
        len(todo),
        model,
        base_url,
    )

    failures: list[tuple[str, str]] = []
    appender = _Appender(out_jsonl) if todo else None
    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        with Progress(console=Console(stderr=True), disable=not progress or not todo) as bar:
            task = bar.add_task(f"reasons via {model}", total=len(todo))
            pending: dict[Future, dict] = {
                pool.submit(teacher, r["id"], r["prompt"], r["paths"]): r for r in todo
            }
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    r = pending.pop(fut)
                    try:
                        reason = fut.result()
                    except _FatalReply:
                        raise ReasonsError(
                            f"{teacher.fatal}. Check --base-url, --model and ${api_key_env}; "
                            "nothing more is asked"
                        ) from None
                    except ReasonsError as e:
                        failures.append((r["id"], str(e)))
                        log.warning("reasons: row %s failed: %s", r["id"], e)
                        continue
                    entry = {k: r[k] for k in ("key", "id", "label", "image_sha256", "prompt_sha256")}
                    entry |= {"model": model, "reason": reason}
                    appender.write(entry)
                    cache[r["key"]] = entry
                    bar.advance(task)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()
        if appender:
            appender.close()
    if failures:
        first_id, first_err = failures[0]
        raise ReasonsError(
            f"{len(failures)} of {len(todo)} reasons failed (first: row {first_id}: {first_err}). The "
            f"{len(todo) - len(failures)} that worked are saved in {out_jsonl}; rerun to ask for the rest"
        )
    out = pd.DataFrame({"id": [r["id"] for r in rows], "reason": [cache[r["key"]]["reason"] for r in rows]})
    out.attrs["stats"] = {
        "rows": len(rows),
        "cached": len(rows) - len(todo),
        "asked": len(todo),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return out


def reason_quality(reasons: list[str], labels: list[str]) -> dict:
    """How many reasons are empty, only restate a label ("This is a refund_request."), or near-copy another.

    E.g. {"n": 400, "empty": 0, "label_restating": 12, "near_duplicate": 57, ...shares}. Counts are
    over non-empty reasons, as the shares from `prompts.checks` are.
    """
    from vlmexp.prompts.checks import label_restating_share, near_duplicate_share

    texts = [r for r in reasons if isinstance(r, str) and r.strip()]
    restating, dup = label_restating_share(texts, labels), near_duplicate_share(texts)
    return {
        "n": len(texts),
        "empty": len(reasons) - len(texts),
        "label_restating": round(restating * len(texts)),
        "label_restating_share": restating,
        "near_duplicate": round(dup * len(texts)),
        "near_duplicate_share": dup,
    }


def reasons_for_competition(
    data_cfg: DataConfig,
    *,
    base_url: str,
    model: str,
    out_jsonl: Path | None = None,
    out_csv: str = "train_with_reasons.csv",
    **kwargs,
) -> dict:
    """`exp reasons DATA`: teacher reasons for every train row, saved next to train.csv.

    Writes `<data dir>/<out_csv>`: train.csv with the `data.reason_col` column set to the teacher's
    reasons (replacing any there), so `exp run data.train_csv=train_with_reasons.csv prompt=reason_label`
    uses them. The JSONL cache defaults to `<data dir>/reasons.jsonl`.
    """
    from vlmexp.data import load_competition

    comp = load_competition(data_cfg)
    out_jsonl = Path(out_jsonl or comp.root / "reasons.jsonl")
    reasons = write_reasons(
        comp.train,
        comp.labels,
        comp.descriptions,
        base_url=base_url,
        model=model,
        out_jsonl=out_jsonl,
        **kwargs,
    )
    # The raw file, read as data.py reads it, so every column and its spelling survive the round trip.
    raw = pd.read_csv(comp.root / data_cfg.train_csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    raw = raw.head(data_cfg.limit) if data_cfg.limit > 0 else raw
    if len(raw) != len(reasons):
        raise ReasonsError(
            f"{data_cfg.train_csv} has {len(raw)} rows but {len(reasons)} reasons were written"
        )
    raw[data_cfg.reason_col] = reasons["reason"].to_numpy()
    csv_path = write_table(raw, comp.root / out_csv)
    return reasons.attrs["stats"] | {
        "out_jsonl": str(out_jsonl),
        "out_csv": str(csv_path),
        "quality": reason_quality(reasons["reason"].tolist(), comp.labels),
    }
