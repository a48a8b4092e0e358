"""Predict through a server that speaks the OpenAI chat API (`vllm serve`, `exp serve`, ...).

`predict.backend=openai predict.base_url=http://127.0.0.1:8000/v1` sends each sample as one chat
request: its system and user turns, images as base64 PNG data URLs where the `{"type": "image"}`
slots are, `temperature=0`. The answer is read back with `parse_answer`, exactly as local
generation is, and the table has the columns of local `predict`: id, pred, p:<label>..., raw.

For label-only prompts (marker "") the request also asks the server to answer with one of the
labels (guided choice). vLLM spells this `guided_choice` up to v0.11 and `structured_outputs.choice`
from v0.10.2 on (the old field was removed in v0.12); each version ignores, with a warning, the
field it does not know, so both are sent. A server that refuses them outright (400, e.g. OpenAI's
own API: "Unrecognized request argument") is asked again without, and the answer is parsed.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from vlmexp.config import Config
from vlmexp.prompts.render import parse_answer
from vlmexp.tables import prob_columns

log = logging.getLogger(__name__)

# `exp serve` adds the class probabilities of its answer under this key, e.g.
# {"cat": 0.91, "dog": 0.09}, so that soft fold voting gets real probabilities, not one-hot ones.
PROBS_FIELD = "vlmexp_probs"
REQUEST_TIMEOUT_S = 120.0


def make_client(base_url: str, timeout: float = REQUEST_TIMEOUT_S):
    import openai

    if not base_url:
        raise ValueError("predict.backend=openai needs predict.base_url, e.g. http://127.0.0.1:8000/v1")
    # Local servers (vllm serve, exp serve) accept any key; a hosted one reads OPENAI_API_KEY.
    return openai.OpenAI(
        base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"), timeout=timeout, max_retries=2
    )


def server_model(client, name: str = "") -> str:
    """`name` if given, else the server's only model (`vllm serve` and `exp serve` host one)."""
    if name:
        return name
    ids = [m.id for m in client.models.list().data]
    if len(ids) != 1:
        raise ValueError(
            f"predict.server_model is empty and the server at {client.base_url} hosts {len(ids)} models "
            f"({', '.join(ids) or 'none'}); pick one, e.g. predict.server_model={ids[0] if ids else 'NAME'}"
        )
    return ids[0]


def image_data_url(img: Image.Image) -> str:
    """A PIL image as "data:image/png;base64,...": PNG is lossless, so the server sees our pixels."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(images[used])}})
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


class _Asker:
    """One chat request per sample; drops guided choice for good after the server refuses it once."""

    def __init__(self, client, model: str, labels: list[str], max_tokens: int):
        self.client, self.model, self.labels, self.max_tokens = client, model, labels, max_tokens
        self.guided = True
        self._lock = threading.Lock()

    def __call__(self, sample: dict) -> tuple[str, dict | None]:
        import openai

        marker = _marker(sample)
        kwargs = {
            "model": self.model,
            "messages": to_openai_messages(sample),
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        if marker == "" and self.guided:
            try:
                return self._send(kwargs, extra_body=choice_body(self.labels))
            except openai.BadRequestError as e:
                # Ask again without; if that fails too, the request was bad for another reason: raise that.
                answer = self._send(kwargs, extra_body=None)
                with self._lock:
                    if self.guided:
                        log.warning("server refused guided choice (%s); asking without, parsing answers", e)
                    self.guided = False
                return answer
        return self._send(kwargs, extra_body=None)

    def _send(self, kwargs: dict, extra_body: dict | None) -> tuple[str, dict | None]:
        reply = self.client.chat.completions.create(**kwargs, extra_body=extra_body)
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
    concurrency: int = 4,
    progress: bool = True,
    client=None,
) -> pd.DataFrame:
    """Like `engine.predict.predict`, through the server at `cfg.predict.base_url`.

    Probabilities: the server's own (`exp serve`), else 1.0 on the parsed label; a parse failure
    gives pred NaN and zeros, and is counted and logged.
    """
    from rich.progress import track

    client = client or make_client(cfg.predict.base_url)
    model = server_model(client, cfg.predict.server_model)
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
