"""`exp serve RUN`: a finished run as an OpenAI-compatible chat-completions server on 127.0.0.1.

`GET /v1/models` lists the fold ensemble under the run's folder name and each fold under
`<name>/fold<k>` (with `--fold K`, that fold only). `POST /v1/chat/completions` takes OpenAI chat
messages with base64 data-URL images, turns them back into an engine sample and answers with the
label that local prediction would give: the run's scoring (or generation) per `predict.mode`, over
the named fold's adapter or the fold ensemble voted as the run votes (`ensemble.vote`; the
test-time reconcile step is not applied). The per-fold names are what an honest out-of-fold
prediction through a server needs: `predict.model_per_fold='{run}/fold{k}'`. The
answer's class probabilities ride along under `vlmexp_probs`; `guided_choice` (vLLM <= 0.11) and
`structured_outputs.choice` (vLLM >= 0.10.2) restrict the answer to those labels.

Built on the standard library's ThreadingHTTPServer, not FastAPI/uvicorn: those are not
dependencies of vlmexp, the server needs two routes, and every model call is serialised by one
lock anyway, so an async framework would buy nothing here. There is no authentication, so it
binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from vlmexp.config import Config, load_config_file
from vlmexp.engine.openai_backend import PROBS_FIELD
from vlmexp.prompts.render import Rendered, load_template
from vlmexp.rundir import RunDir
from vlmexp.tables import PROB_PREFIX, probs

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request holds a few base64 images; 64 MiB is far beyond that
# Decoded pixels per request, all its images together: 40 MP is twenty 1920x1080 screenshots. A PNG of
# 12000 x 12000 flat pixels is only 594 KB on the wire but 144 MP (432 MB as RGB, 36 s to process).
MAX_PIXELS = 40_000_000
# Connections the kernel queues while the accept loop is busy; the standard library's 5 dropped
# connections with 32 concurrent clients.
LISTEN_BACKLOG = 256


class RequestError(ValueError):
    """A request the client must fix; becomes an OpenAI-style error JSON with `status`."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run folder (runs/<name>)?")
    return load_config_file(path)


def run_labels(run_dir: Path, cfg: Config) -> list[str]:
    """Class order from the run's own prediction tables, else from the competition's labels.json."""
    run = RunDir(Path(run_dir))
    for table in [run.path("test_probs.csv"), *(run.fold_dir(k) / "oof.csv" for k in range(cfg.folds))]:
        if table.exists():
            cols = pd.read_csv(table, nrows=0).columns
            labels = [c[len(PROB_PREFIX) :] for c in cols if c.startswith(PROB_PREFIX)]
            if labels:
                return labels
    from vlmexp.data import load_competition

    return load_competition(cfg.data).labels


class RunPredictor:
    """A run's fold models behind `answer(sample, choices, model)`: the fold ensemble under the run's
    name and each fold under `<run>/fold<k>` (one base model, each fold a named LoRA adapter), or
    with `fold=K` that one fold only."""

    def __init__(self, run_dir: Path, fold: int | None = None):
        from vlmexp.models.load import load_processor

        self.run = RunDir(Path(run_dir))
        self.run_dir = self.run.root
        self.cfg = load_run_config(self.run_dir)
        self.labels = run_labels(self.run_dir, self.cfg)
        self.marker = self._marker()
        self.folds = self._folds(fold)
        # model name -> the folds that answer, e.g. {"demo-1a2b": [0, 1], "demo-1a2b/fold0": [0], ...}
        self.models = {f"{self.run_dir.name}/fold{k}": [k] for k in self.folds}
        if fold is None:
            self.models = {self.run_dir.name: list(self.folds)} | self.models
        self.name = next(iter(self.models))  # the ensemble, or the one fold
        self.processor = load_processor(self.cfg)
        self._models = dict(zip(self.folds, self._load(), strict=True))
        self._lock = threading.Lock()  # one model call at a time: torch modules are not re-entrant

    def _marker(self) -> str:
        """The marker of the template the run trained on: its saved copy (runs/<name>/prompt/) first."""
        saved = self.run_dir / "prompt"
        return load_template(self.cfg.prompt, str(saved) if saved.is_dir() else self.cfg.prompts.dir).marker

    def _folds(self, fold: int | None) -> list[int]:
        done = self.run.done_folds(self.cfg.folds)
        if fold is not None:
            if fold not in done:
                raise FileNotFoundError(
                    f"{self.run_dir}: fold {fold} is not finished (no {self.run.fold_dir(fold)}/done.json); "
                    f"finished folds: {done or 'none'}"
                )
            return [fold]
        if len(done) != self.cfg.folds:
            raise FileNotFoundError(
                f"{self.run_dir}: {len(done)} of {self.cfg.folds} folds finished ({done}); finish the run "
                f"with exp run, or serve one finished fold with --fold K"
            )
        return done

    def _load(self) -> list[tuple[object, str | None]]:
        """[(model, adapter name)] per fold: LoRA folds share one base model, each fold a named adapter."""
        from vlmexp.models.load import load_for_inference

        dirs = [self.run.adapter_dir(k) for k in self.folds]
        if all((d / "adapter_config.json").exists() for d in dirs):
            model = load_for_inference(self.cfg, dirs[0])
            for k, d in zip(self.folds[1:], dirs[1:], strict=True):
                model.load_adapter(str(d), adapter_name=f"fold{k}", is_trainable=False)
            names = ["default"] + [f"fold{k}" for k in self.folds[1:]]
            return [(model, name) for name in names]
        # finetune=full: each fold saved a whole model
        full = []
        for d in dirs:
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"{d}: neither a LoRA adapter nor a saved model; retrain this fold")
            cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, name=str(d)))
            full.append((load_for_inference(cfg, None), None))
        return full

    def answer(
        self, sample: dict, choices: list[str] | None = None, model_name: str = ""
    ) -> tuple[str, dict[str, float]]:
        """(message content, {label: probability}) for one sample from the model named `model_name`
        (default: the ensemble, or the one fold); the label is restricted to `choices`."""
        from vlmexp.engine.predict import predict
        from vlmexp.kfold.ensemble import vote

        tables = []
        with self._lock:
            for model, adapter in (self._models[k] for k in self.models[model_name or self.name]):
                if adapter is not None:
                    model.set_adapter(adapter)
                tables.append(predict(self.cfg, model, self.processor, [sample], self.labels, progress=False))
        first = tables[0].iloc[0]
        raw = str(first["raw"]) if "raw" in tables[0] and pd.notna(first["raw"]) else ""
        if all(pd.isna(t["pred"].iloc[0]) for t in tables):  # generation named no label in any fold
            return raw, {label: 0.0 for label in self.labels}
        table = tables[0] if len(tables) == 1 else vote(tables, self.labels, how=self.cfg.ensemble.vote)
        p, pred = probs(table, self.labels)[0], str(table["pred"].iloc[0])
        if choices is not None and set(choices) != set(self.labels):
            keep = np.array([label in choices for label in self.labels])
            p = np.where(keep, p, 0.0)
            p = p / p.sum() if p.sum() > 0 else keep / keep.sum()
            pred = pred if pred in choices else self.labels[int(np.argmax(p))]
        return self._content(pred, raw), dict(zip(self.labels, map(float, p), strict=True))

    def _content(self, label: str, raw: str) -> str:
        """The label alone, or for reason/CoT prompts the reasoning, the marker and the label."""
        if not self.marker:
            return label
        cut = raw.find(self.marker.rstrip())
        reason = (raw[:cut] if cut >= 0 else raw).rstrip()
        return f"{reason}\n{self.marker}{label}" if reason else f"{self.marker}{label}"


# -- OpenAI request -> engine sample ----------------------------------------------------------------


def decode_image(url: str, cfg: Config, max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, int]:
    """A data URL ("data:image/png;base64,...") -> (RGB PIL image resized as the run's samples are,
    pixels decoded). The size in the image's header is checked against `max_pixels` before any pixel
    is decoded."""
    from vlmexp.data import DataError, open_image
    from vlmexp.engine.samples import resize_image

    if not url.startswith("data:"):
        raise RequestError(
            f"image_url {url[:60]!r}: only base64 data URLs are accepted (data:image/png;base64,...); "
            "this server fetches nothing from the network",
            param="messages",
        )
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError(f"image data URL {header!r} is not base64-encoded", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x 89 MP) struck first
        raise RequestError(
            f"image in {header!r}: {e}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, param="messages"
        ) from None
    except (binascii.Error, OSError, ValueError) as e:
        raise RequestError(f"cannot decode the image in {header!r}: {e}", param="messages") from None
    if width * height > max_pixels:
        raise RequestError(
            f"image in {header!r} is {width}x{height} = {width * height / 1e6:.1f} MP, over the "
            f"{max_pixels / 1e6:g} MP left of this server's cap on decoded pixels per request "
            "(exp serve --max-pixels). Send it downscaled: the run resizes images itself",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            param="messages",
        )
    try:
        return resize_image(open_image(io.BytesIO(data)), cfg), width * height
    except DataError as e:
        raise RequestError(f"cannot decode the image in {header!r}: {e}", param="messages") from None


def request_sample(body: dict, cfg: Config, marker: str = "", max_pixels: int = MAX_PIXELS) -> dict:
    """OpenAI chat messages -> {id, images, messages (HF chat), rendered}, as `build_samples` makes.

    `max_pixels` bounds the decoded pixels of all the request's images together."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages", param="messages")
    hf, images, texts = [], [], {"system": [], "user": []}
    decoded = 0  # pixels of the request's images so far
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"messages[{i}]: role {role!r}; use system, user or assistant", param="messages"
            )
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(
                f"messages[{i}]: content must be a string or a list of parts", param="messages"
            )
        out = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                out.append({"type": "text", "text": str(part.get("text", ""))})
                texts.setdefault(role, []).append(str(part.get("text", "")))
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url", "") if isinstance(ref, dict) else str(ref or "")
                img, pixels = decode_image(url, cfg, max_pixels - decoded)
                images.append(img)
                decoded += pixels
                out.append({"type": "image"})
            else:
                raise RequestError(f"messages[{i}]: unsupported content part {kind!r}", param="messages")
        hf.append({"role": role, "content": out})
    if hf[-1]["role"] != "user":
        raise RequestError("the last message must be the user's (the image to classify)", param="messages")
    if not images:
        raise RequestError(
            "the request has no image: add an image_url part with a data URL", param="messages"
        )
    rendered = Rendered(
        system="\n".join(texts["system"]), user="\n".join(texts["user"]), answer="", marker=marker
    )
    return {"id": "request", "images": images, "messages": hf, "rendered": rendered}


def requested_choices(body: dict, labels: list[str]) -> list[str] | None:
    """The guided choice of a request (either vLLM spelling), checked against the run's labels."""
    structured = body.get("structured_outputs") or {}
    choices = body.get("guided_choice") or (
        structured.get("choice") if isinstance(structured, dict) else None
    )
    if choices is None:
        return None
    if not isinstance(choices, list) or not choices:
        raise RequestError("guided choice must be a non-empty list of labels", param="guided_choice")
    unknown = [c for c in choices if c not in labels]
    if unknown:
        raise RequestError(
            f"guided choice {unknown[:5]} are not labels of this run; its labels: {', '.join(labels)}",
            param="guided_choice",
        )
    return [str(c) for c in choices]


def completion(body: dict, predictor: RunPredictor, max_pixels: int = MAX_PIXELS) -> dict:
    model = body.get("model")
    if model not in predictor.models:
        # OpenAI and vLLM answer an unknown model with 404 model_not_found; so do we.
        raise RequestError(
            f"model {model!r} does not exist; this server hosts {', '.join(map(repr, predictor.models))}",
            HTTPStatus.NOT_FOUND,
            param="model",
        )
    if body.get("stream"):
        raise RequestError("stream=true is not supported; ask without streaming", param="stream")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported: the answer is deterministic", param="n")
    choices = requested_choices(body, predictor.labels)
    sample = request_sample(body, predictor.cfg, predictor.marker, max_pixels)
    content, p = predictor.answer(sample, choices, model)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        PROBS_FIELD: p,
    }


# -- HTTP -----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    timeout = 120  # seconds an idle keep-alive connection may hold its thread

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, open_=False)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") == "/v1/models":
            cards = [
                {"id": name, "object": "model", "created": 0, "owned_by": "vlmexp"}
                for name in self.server.predictor.models
            ]
            self._json(HTTPStatus.OK, {"object": "list", "data": cards})
        elif self.path == "/health":
            self._json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(RequestError(f"no route GET {self.path}; try /v1/models", HTTPStatus.NOT_FOUND))

    def do_POST(self) -> None:  # noqa: N802
        try:
            body = self._body()  # read it whatever the route: unread bytes would corrupt the next request
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestError(
                    f"no route POST {self.path}; try /v1/chat/completions", HTTPStatus.NOT_FOUND
                )
            self._json(HTTPStatus.OK, completion(body, self.server.predictor, self.server.max_pixels))
        except RequestError as e:
            self._error(e)
        except Exception as e:  # a bug or a model failure: say so, keep serving
            log.exception("request failed")
            self._error(RequestError(f"{type(e).__name__}: {e}", HTTPStatus.INTERNAL_SERVER_ERROR))

    def _body(self) -> dict:
        size = self._content_length()
        if size > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread, so this connection cannot be reused
            raise RequestError(
                f"request body of {size} bytes exceeds {MAX_BODY_BYTES}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            )
        try:
            body = json.loads(self.rfile.read(size) or b"null")
        except ValueError as e:
            raise RequestError(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object with 'model' and 'messages'")
        return body

    def _content_length(self) -> int:
        """The body's size in bytes from one plain Content-Length; anything else ends the connection.

        A negative value once read as "up to EOF", past the size cap: "-1" with a 300 MiB body.
        """
        values = self.headers.get_all("Content-Length") or []
        if not values or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(
                "a POST needs a Content-Length header (chunked bodies are not accepted)",
                HTTPStatus.LENGTH_REQUIRED,
            )
        if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,12}", values[0].strip()):
            self.close_connection = True
            raise RequestError(f"Content-Length {', '.join(values)!r} is not one byte count (0, 1, 2, ...)")
        return int(values[0])

    def _error(self, e: RequestError) -> None:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self._json(
            e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": int(e.status)}}
        )

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on close, never left as daemons: a daemon thread that still holds
    # the last reference to a model when the interpreter exits frees torch tensors after Python has
    # stopped handing out the GIL, and the process aborts ("terminate called without an active
    # exception", exit 134) after all work succeeded. server_close() first shuts every open
    # connection (an idle keep-alive client would otherwise block its thread in recv), then joins.
    daemon_threads = False
    block_on_close = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], predictor: RunPredictor, max_pixels: int = MAX_PIXELS):
        super().__init__(address, _Handler)
        self.predictor, self.max_pixels = predictor, max_pixels
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def server_close(self) -> None:
        """Close open connections, then (ThreadingMixIn) close the socket and join handler threads."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading the next request
            except OSError:
                pass  # already closed by the client
        super().server_close()
        self.predictor = None  # the models are freed here, on the closing thread, not at exit

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    fold: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> _Server:
    """The server, bound but not yet serving (port 0 picks a free one); run it with serve_forever()."""
    if max_pixels < 1:
        raise ValueError(
            f"max_pixels={max_pixels}: give the most decoded pixels a request may hold, e.g. 40000000"
        )
    predictor = RunPredictor(Path(run_dir), fold)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s: anyone who can reach it can use the model; there is no authentication", host
        )
    return _Server((host, port), predictor, max_pixels)


@contextlib.contextmanager
def running(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """Serve on a background thread for the `with` block; on exit stop, close connections, join."""
    thread = threading.Thread(target=server.serve_forever, name="exp-serve")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(
    run_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    fold: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> None:
    """Serve until Ctrl-C: `exp serve runs/baseline-1a2b3c4d --port 8000`."""
    server = make_server(run_dir, host, port, fold, max_pixels)
    names = ", ".join(server.predictor.models)
    log.info("serving %s as models %s at %s (Ctrl-C stops)", run_dir, names, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
