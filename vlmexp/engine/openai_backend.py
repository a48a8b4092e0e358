"""Predict through a server that speaks the OpenAI chat API (`vllm serve`, `exp serve`, ...).

`predict.backend=openai predict.base_url=http://127.0.0.1:8000/v1` sends each sample as one chat
request: its system and user turns, images as base64 PNG data URLs where the `{"type": "image"}`
slots are, `temperature=0`. The answer is read back with `parse_answer`, exactly as local
generation is, and the table has the columns of local `predict`: id, pred, p:<label>..., raw.

For label-only prompts (marker "") the request also asks the server to answer with one of the
labels (guided choice). vLLM spells this `guided_choice` up to v0.11 and `structured_outputs.choice`
from v0.10.2 on (the old field was removed in v0.12); each version ignores, with a warning, the
field it does not know, so both are sent. Every request also asks for the chat template's
non-thinking form (`chat_template_kwargs`), the form the folds were trained on. A server that refuses
these outright (400, e.g. OpenAI's own API: "Unrecognized request argument") is asked again without
any of them, and the answer is parsed.

In a run (`exp run predict.backend=openai`) fold k's out-of-fold rows and its test rows go to fold k's
own model, named by `predict.model_per_fold` ("{run}/fold{k}", the names `exp serve RUN` gives, or
"fold{k}" for `vllm serve BASE --enable-lora --lora-modules fold0=runs/X/folds/fold0/adapter ...`);
one model for every fold would have seen each fold's validation rows in training. A fold model the
server lacks is loaded from the fold's adapter through vLLM's runtime LoRA API.
The client (key, retries, redaction, data URLs) is `vlmexp.openai_client`'s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from vlmexp.config import Config
from vlmexp.engine.samples import NON_THINKING
from vlmexp.openai_client import (
    ServerError,
    chat,
    data_url,
    load_lora_adapter,
    make_client,
    model_ids,
    unload_lora_adapter,
)
from vlmexp.prompts.render import parse_answer
from vlmexp.tables import prob_columns

log = logging.getLogger(__name__)

# `exp serve` adds the class probabilities of its answer under this key, e.g.
# {"cat": 0.91, "dog": 0.09}, so that soft fold voting gets real probabilities, not one-hot ones.
PROBS_FIELD = "vlmexp_probs"
# The name `exp serve RUN` gives fold k's model, e.g. "demo-1a2b3c4d/fold3"; as predict.model_per_fold
# it asks exactly those.
SERVED_FOLD_MODEL = "{run}/fold{k}"
REQUEST_TIMEOUT_S = 120.0
OOF_REFUSAL = (
    "predict.backend=openai needs one model per fold: with one model at predict.base_url every fold's "
    "out-of-fold rows would be predicted by a model that trained on them, and the CV would not be "
    "out-of-fold. Set predict.model_per_fold to a name with {k}, e.g. "
    "\"predict.model_per_fold='{run}/fold{k}'\" (quoted so, in a shell: the names `exp serve RUN` gives; "
    "{run} is the run's folder name) or fold{k} for "
    "`vllm serve BASE --enable-lora --lora-modules fold0=runs/X/folds/fold0/adapter fold1=...`; "
    "a vLLM started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True gets each fold's adapter loaded as it is "
    "trained"
)


def server_model(client, name: str = "") -> str:
    """`name` if given, else the server's only model (`vllm serve` of one model hosts one)."""
    if name:
        return name
    ids = model_ids(client)
    if len(ids) != 1:
        raise ValueError(
            f"predict.server_model is empty and the server at {client.base_url} hosts {len(ids)} models "
            f"({', '.join(ids) or 'none'}); pick one, e.g. predict.server_model={ids[0] if ids else 'NAME'}"
        )
    return ids[0]


def fold_model_name(cfg: Config, run_name: str, k: int) -> str:
    """Fold k's model name on the server: predict.model_per_fold filled in, e.g. "{run}/fold{k}" ->
    "demo-1a2b3c4d/fold3" (what `exp serve` calls it) or "fold{k}" -> "fold3" (a vLLM --lora-modules name)."""
    template = cfg.predict.model_per_fold
    if "{k}" not in template:
        raise ValueError(OOF_REFUSAL)
    return template.format(run=run_name, k=k)


# (server URL, model name) -> the adapter this process loaded under that name, as (path, weights mtime):
# the OOF rows and the test rows of one fold load it once, a retrained fold (--force) loads it again.
_LOADED: dict[tuple[str, str], tuple[str, int]] = {}
_LOADED_LOCK = threading.Lock()


def _adapter_stamp(adapter_dir: Path) -> tuple[str, int]:
    weights = [p for p in Path(adapter_dir).glob("adapter_model.*")] or [
        Path(adapter_dir) / "adapter_config.json"
    ]
    return str(Path(adapter_dir).resolve()), max(p.stat().st_mtime_ns for p in weights)


def ensure_fold_model(client, name: str, adapter_dir: Path | None) -> None:
    """Make sure the server answers as model `name` with this fold's adapter in `adapter_dir`.

    Through vLLM's runtime LoRA API the adapter is loaded (or, under a name already taken, e.g. by the
    fold before a --force rerun, replaced). A server without that API (`exp serve RUN`, `vllm serve
    --lora-modules ...`) is trusted to host the fold under that name, as it was started.
    """
    ids = model_ids(client)
    key = (str(client.base_url), name)
    if adapter_dir is None or not (Path(adapter_dir) / "adapter_config.json").exists():
        if name in ids:
            return
        raise ServerError(
            f"the server at {client.base_url} has no model {name!r} (it hosts {', '.join(ids) or 'none'}) "
            f"and there is no LoRA adapter to load in {adapter_dir}. Serve each fold under its own name: "
            "exp serve RUN (names <run>/fold<k>), or vllm serve --lora-modules NAME=ADAPTER_DIR ..."
        )
    stamp = _adapter_stamp(adapter_dir)
    with _LOADED_LOCK:
        if name in ids and _LOADED.get(key) == stamp:
            return
    if name in ids:
        try:
            unload_lora_adapter(client, name)
        except ServerError as e:
            if e.status not in (404, 405):
                raise
            log.info(
                "%s has no runtime LoRA API: using its own model %r for %s",
                client.base_url,
                name,
                adapter_dir,
            )
            with _LOADED_LOCK:
                _LOADED[key] = stamp
            return
    try:
        load_lora_adapter(client, name, Path(adapter_dir))
    except ServerError as e:
        raise ServerError(
            f"the server at {client.base_url} has no model {name!r} and loading fold adapter {adapter_dir} "
            f"failed: {e}. Fix: start vLLM with --enable-lora --max-lora-rank R and the environment "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or give every fold at start: vllm serve BASE "
            "--enable-lora --lora-modules fold0=runs/X/folds/fold0/adapter fold1=... with "
            "predict.model_per_fold='fold{k}'",
            status=e.status,
        ) from None
    with _LOADED_LOCK:
        _LOADED[key] = stamp
    log.info("loaded fold adapter %s on %s as model %r", adapter_dir, client.base_url, name)


def to_openai_messages(sample: dict) -> list[dict]:
    """HF multimodal chat -> OpenAI chat; images fill the `{"type": "image"}` slots in order.

    The final assistant turn (the gold answer of a training sample) is dropped: it is what we ask for.
    """
    images = list(sample.get("images") or [])
    messages = list(sample["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    out, used = [], 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                if used >= len(images):
                    raise ValueError(
                        f"sample {sample.get('id')!r}: more image slots than its {len(images)} images"
                    )
                parts.append({"type": "image_url", "image_url": {"url": data_url(images[used])}})
                used += 1
            elif part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(
                    f"sample {sample.get('id')!r}: unsupported content part {part.get('type')!r}"
                )
        if m["role"] != "user" and all(p["type"] == "text" for p in parts):
            # system/assistant turns as plain strings: some servers accept content lists in user turns only
            out.append({"role": m["role"], "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    if used != len(images):
        raise ValueError(
            f"sample {sample.get('id')!r}: {len(images)} images but {used} image slots in its messages"
        )
    return out


def choice_body(labels: list[str]) -> dict:
    """vLLM's guided choice in both spellings (see the module docstring)."""
    return {"guided_choice": list(labels), "structured_outputs": {"choice": list(labels)}}


def vllm_body(labels: list[str] | None) -> dict:
    """vLLM's request extras: the chat template rendered non-thinking, as every fold was trained
    (`samples.template_kwargs`; a Qwen3.5 server would otherwise open "<think>" and spend max_tokens
    on a thought before any label; templates without the switch ignore it), plus guided choice for
    label-only prompts (`labels`)."""
    return {"chat_template_kwargs": dict(NON_THINKING)} | (choice_body(labels) if labels else {})


class _Asker:
    """One chat request per sample; drops vLLM's extras for good after the server refuses them once."""

    def __init__(self, client, model: str, labels: list[str], max_tokens: int):
        self.client, self.model, self.labels, self.max_tokens = client, model, labels, max_tokens
        self.extras = True
        self._lock = threading.Lock()

    def __call__(self, sample: dict) -> tuple[str, dict | None]:
        marker = _marker(sample)
        kwargs = {
            "model": self.model,
            "messages": to_openai_messages(sample),
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        if not self.extras:
            return self._send(kwargs, extra_body=None)
        try:
            return self._send(kwargs, extra_body=vllm_body(self.labels if marker == "" else None))
        except ServerError as e:
            if e.status != 400:
                raise
            # Ask again without; if that fails too, the request was bad for another reason: raise that.
            answer = self._send(kwargs, extra_body=None)
            with self._lock:
                if self.extras:
                    log.warning(
                        "server refused vLLM's request fields (guided choice, chat_template_kwargs): %s; "
                        "asking without, parsing answers",
                        e,
                    )
                self.extras = False
            return answer

    def _send(self, kwargs: dict, extra_body: dict | None) -> tuple[str, dict | None]:
        reply = chat(self.client, **kwargs, extra_body=extra_body)
        text = reply.choices[0].message.content or ""
        return text, (reply.model_extra or {}).get(PROBS_FIELD)


def _marker(sample: dict) -> str:
    rendered = sample.get("rendered")
    if rendered is None:
        raise ValueError(f"sample {sample.get('id')!r} has no 'rendered' prompt; build it with build_samples")
    return rendered.marker


def _row(sample: dict, text: str, server_probs: dict | None, labels: list[str]) -> dict:
    pred = parse_answer(text, labels, _marker(sample))
    p = np.zeros(len(labels))
    if server_probs and pred is not None:
        p = np.array([float(server_probs.get(label, 0.0)) for label in labels])
    elif pred is not None:
        p[labels.index(pred)] = 1.0
    return {
        "id": sample["id"],
        "pred": pred if pred is not None else np.nan,
        **dict(zip(prob_columns(labels), p, strict=True)),
        "raw": text,
    }


def predict_openai(
    cfg: Config,
    samples: list[dict],
    labels: list[str],
    *,
    model: str = "",
    concurrency: int = 4,
    progress: bool = True,
    client=None,
) -> pd.DataFrame:
    """Like `engine.predict.predict`, through the server at `cfg.predict.base_url`, asking `model`
    (default: predict.server_model, else the server's only model).

    Probabilities: the server's own (`exp serve`), else 1.0 on the parsed label; a parse failure
    gives pred NaN and zeros, and is counted and logged.
    """
    from rich.progress import track

    with _client(cfg, client) as client:
        model = model or server_model(client, cfg.predict.server_model)
        ask = _Asker(client, model, labels, max_tokens=cfg.predict.max_new_tokens)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            answers = pool.map(ask, samples)  # map keeps the samples' order
            answers = list(
                track(answers, total=len(samples), description=f"predict via {model}", disable=not progress)
            )
    table = pd.DataFrame(
        [_row(s, text, probs, labels) for s, (text, probs) in zip(samples, answers, strict=True)],
        columns=["id", "pred", *prob_columns(labels), "raw"],
    )
    failed = int(table["pred"].isna().sum())
    if failed:
        log.warning(
            "%d of %d answers from %s did not parse to a label, e.g. %r; their pred is empty",
            failed,
            len(table),
            model,
            table.loc[table["pred"].isna(), "raw"].iloc[0][:120],
        )
    return table


def predict_fold_openai(
    cfg: Config,
    samples: list[dict],
    labels: list[str],
    *,
    run_name: str,
    k: int,
    adapter_dir: Path | None = None,
    concurrency: int = 4,
    progress: bool = True,
    client=None,
) -> pd.DataFrame:
    """Fold k's rows (its out-of-fold rows, or the test set) predicted by fold k's own model on the
    server, named by predict.model_per_fold; loaded from `adapter_dir` first if the server lacks it."""
    name = fold_model_name(cfg, run_name, k)
    with _client(cfg, client) as client:
        ensure_fold_model(client, name, adapter_dir)
        return predict_openai(
            cfg, samples, labels, model=name, concurrency=concurrency, progress=progress, client=client
        )


@contextlib.contextmanager
def _client(cfg: Config, client=None) -> Iterator:
    """The caller's client as it is, or a new one for predict.base_url that is closed afterwards."""
    if client is not None:
        yield client
        return
    with make_client(cfg.predict.base_url, timeout=REQUEST_TIMEOUT_S) as own:
        yield own
