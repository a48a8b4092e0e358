"""The one OpenAI-compatible client of vlmexp: `exp reasons` and `predict.backend=openai` both use it.

- One API-key source: the environment variable named by `api_key_env` (default OPENAI_API_KEY).
  Local servers (`vllm serve`, `exp serve`) take any key, so an unset variable sends "EMPTY".
- Retries and backoff are the openai client's own (`max_retries`): 408, 409, 429, 5xx and lost
  connections are retried with exponential backoff and jitter (0.5 s, 1 s, 2 s ... capped at 8 s),
  honouring the server's `Retry-After` / `retry-after-ms`. Nothing here re-implements them.
- One data-URL encoder: a file's own bytes (the server sees exactly the competition image) or a PIL
  image as PNG (lossless, so the server sees our pixels).
- One redaction: every error and log message that leaves this module, and every record the openai,
  httpx and httpcore loggers write, has the key and anything shaped like a secret ("Bearer abc...",
  "sk-...") replaced by "***". A proxy that echoes the Authorization header in its error body
  ("invalid credentials: Bearer sk-...") thus never puts the key into a log or a traceback.
- One reply check: a reply that is not an OpenAI chat completion (an HTML error page, broken JSON,
  no choices) is a `ServerError` naming the server and the first 200 characters that came back.
"""

from __future__ import annotations

import base64
import io
import logging
import mimetypes
import os
import re
import threading
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
PLACEHOLDER_KEY = "EMPTY"
# Statuses the openai client retries itself (openai._base_client._should_retry): rate limits, lock
# and request timeouts, server errors.
RETRIED = {408, 409, 429}
# Things shaped like a secret, whatever the key's variable: "Bearer eyJhbGciOi...", "sk-proj-AbC123...",
# "api_key=abc123", "x-api-key: abc123".
_SECRET_RE = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;}]+"
    r"|\bsk-[A-Za-z0-9_\-]{4,}"
    r"|((?:api[_-]?key|x-api-key|authorization)[\"']?\s*[:=]\s*[\"']?)(?!bearer\b)[^\s\"',;}]+"
)
_LIBRARY_LOGGERS = ("openai", "openai._base_client", "httpx", "httpcore.http11", "httpcore.connection")

_secrets: set[str] = set()  # every key value this process has sent
_secrets_lock = threading.Lock()


class ServerError(RuntimeError):
    """A server's refusal or unusable reply, redacted. `status` is the HTTP status (None: no reply)."""

    def __init__(self, message: str, status: int | None = None, retried: bool = False):
        super().__init__(redact(message))
        self.status, self.retried = status, retried


def redact(text: str) -> str:
    """`text` with every known key and anything shaped like a secret replaced by ***."""
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, "***")
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2) or "") + "***", text)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = _RedactingFilter()


def _redact_library_logs() -> None:
    # A logger's filter sees only the records created on that logger, hence one per library logger.
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def api_key(env: str = DEFAULT_KEY_ENV) -> str:
    """The key from $`env`, remembered for redaction; "EMPTY" (fine for local servers) when unset."""
    key = os.environ.get(env, "").strip()
    if not key:
        log.info("$%s is unset: sending the key %r (fine for local servers)", env, PLACEHOLDER_KEY)
        return PLACEHOLDER_KEY
    if len(key) >= 6:  # a local server's short key, e.g. "abc", would turn every "abc" in a message into ***
        with _secrets_lock:
            _secrets.add(key)
    return key


def make_client(
    base_url: str,
    *,
    api_key_env: str = DEFAULT_KEY_ENV,
    timeout: float = 120.0,
    max_retries: int = 2,
):
    """An `openai.OpenAI` client for `base_url`; close it (`with make_client(...) as client:`)."""
    import openai

    if not base_url:
        raise ValueError("no server URL; give one, e.g. predict.base_url=http://127.0.0.1:8000/v1")
    _redact_library_logs()
    return openai.OpenAI(
        base_url=base_url, api_key=api_key(api_key_env), timeout=timeout, max_retries=max_retries
    )


def describe(err: Exception) -> str:
    """e.g. "AuthenticationError (HTTP 401): Error code: 401 - invalid credentials: Bearer ***"."""
    status = getattr(err, "status_code", None)
    return redact(f"{type(err).__name__}" + (f" (HTTP {status})" if status else "") + f": {err}")


def _raw(client, what: str, call):
    """`call()` of a `with_raw_response` method; the openai client's errors become ServerError.

    The openai client has already retried what it retries when an error gets here; `retried` says so.
    """
    import openai

    tries = client.max_retries + 1
    try:
        return call()
    except openai.APIStatusError as e:
        retried = e.status_code in RETRIED or e.status_code >= 500
        after = f" after {tries} tries" if retried else ""
        raise ServerError(
            f"{client.base_url} refused {what}{after}: {describe(e)}", status=e.status_code, retried=retried
        ) from None
    except openai.APIConnectionError as e:  # includes timeouts
        raise ServerError(
            f"{client.base_url} did not answer {what} after {tries} tries: {describe(e)}; is the server up?",
            retried=True,
        ) from None


def _not_openai(client, what: str, http, expected: str) -> ServerError:
    return ServerError(
        f"{client.base_url}: the reply to {what} is not {expected} (HTTP {http.status_code}, "
        f"{http.headers.get('content-type', 'no content type')}); it began {http.text[:200]!r}. "
        "Is the URL the server's OpenAI /v1 address?",
        status=http.status_code,
    )


def chat(client, **kwargs):
    """`client.chat.completions.create(**kwargs)`, checked: a reply with a message, else ServerError."""
    from openai.types.chat import ChatCompletion

    what = "POST /chat/completions"
    raw = _raw(client, what, lambda: client.chat.completions.with_raw_response.create(**kwargs))
    try:
        reply = raw.parse()
    except ValueError:  # broken JSON
        reply = None
    choices = getattr(reply, "choices", None) if isinstance(reply, ChatCompletion) else None
    if not choices or getattr(choices[0], "message", None) is None:
        raise _not_openai(client, what, raw.http_response, "an OpenAI chat completion")
    return reply


def model_ids(client) -> list[str]:
    """The ids of `GET /models`, e.g. ["runs-x", "runs-x/fold0", "runs-x/fold1"]."""
    what = "GET /models"
    raw = _raw(client, what, lambda: client.models.with_raw_response.list())
    try:
        return [str(m.id) for m in raw.parse().data]
    except (ValueError, AttributeError, TypeError):  # broken JSON, an HTML page, no "data" list
        raise _not_openai(client, what, raw.http_response, "an OpenAI model list") from None


def load_lora_adapter(client, name: str, adapter_dir: Path) -> None:
    """vLLM's runtime LoRA loading: POST /v1/load_lora_adapter (the server needs
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). The server reads `adapter_dir` itself: it must see that path."""
    body = {"lora_name": name, "lora_path": str(Path(adapter_dir).resolve())}
    _raw(client, "POST /load_lora_adapter", lambda: client.post("/load_lora_adapter", body=body, cast_to=str))


def unload_lora_adapter(client, name: str) -> None:
    """vLLM's runtime LoRA unloading (POST /v1/unload_lora_adapter): frees `name` for a new adapter."""
    body = {"lora_name": name}
    _raw(
        client,
        "POST /unload_lora_adapter",
        lambda: client.post("/unload_lora_adapter", body=body, cast_to=str),
    )


def data_url(image: str | Path | Image.Image) -> str:
    """A file's own bytes, or a PIL image as PNG, as "data:image/png;base64,..."."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        mime, data = "image/png", buf.getvalue()
    else:
        mime, data = mimetypes.guess_type(str(image))[0] or "image/png", Path(image).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
