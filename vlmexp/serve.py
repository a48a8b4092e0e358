"""`exp serve RUN`: a finished run as an OpenAI-compatible chat-completions server on 127.0.0.1.

`GET /v1/models` lists the run as one model (its folder name, or `<name>/fold<k>` for one fold);
`POST /v1/chat/completions` takes OpenAI chat messages with base64 data-URL images, turns them
back into an engine sample and answers with the label that local prediction would give: the
run's scoring (or generation) per `predict.mode`, over one fold's adapter or the fold ensemble
voted as the run votes (`ensemble.vote`; the test-time reconcile step is not applied). The
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

from vlmexp.config import Config, load_config_file
from vlmexp.engine.openai_backend import PROBS_FIELD
from vlmexp.prompts.render import Rendered, load_template
from vlmexp.tables import PROB_PREFIX, probs

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request holds a few base64 images; 64 MiB is far beyond that


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
    for table in [Path(run_dir) / "test_probs.csv", *sorted(Path(run_dir).glob("folds/fold*/oof.csv"))]:
        if table.exists():
            cols = pd.read_csv(table, nrows=0).columns
            labels = [c[len(PROB_PREFIX) :] for c in cols if c.startswith(PROB_PREFIX)]
            if labels:
                return labels
    from vlmexp.data import load_competition

    return load_competition(cfg.data).labels


class RunPredictor:
    """A run's fold models (one, or all for the ensemble) behind `answer(sample, choices)`."""

    def __init__(self, run_dir: Path, fold: int | None = None):
        from vlmexp.models.load import load_processor

        self.run_dir = Path(run_dir)
        self.cfg = load_run_config(self.run_dir)
        self.labels = run_labels(self.run_dir, self.cfg)
        self.marker = self._marker()
        self.folds = self._folds(fold)
        self.name = self.run_dir.name + (f"/fold{fold}" if fold is not None else "")
        self.processor = load_processor(self.cfg)
        self._models = self._load()
        self._lock = threading.Lock()  # one model call at a time: torch modules are not re-entrant

    def _marker(self) -> str:
        """The marker of the template the run trained on: its saved copy (runs/<name>/prompt/) first."""
        saved = self.run_dir / "prompt"
        return load_template(self.cfg.prompt, str(saved) if saved.is_dir() else self.cfg.prompts.dir).marker

    def _folds(self, fold: int | None) -> list[int]:
        done = [k for k in range(self.cfg.folds) if (self.run_dir / f"folds/fold{k}/done.json").exists()]
        if fold is not None:
            if fold not in done:
                raise FileNotFoundError(
                    f"{self.run_dir}: fold {fold} is not finished (no folds/fold{fold}/done.json); "
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
        """[(model, adapter name)]: LoRA folds share one base model, each fold a named adapter."""
        from vlmexp.models.load import load_for_inference

        dirs = [self.run_dir / f"folds/fold{k}/adapter" for k in self.folds]
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

    def answer(self, sample: dict, choices: list[str] | None = None) -> tuple[str, dict[str, float]]:
        """(message content, {label: probability}) for one sample; the label is restricted to `choices`."""
        from vlmexp.engine.predict import predict
        from vlmexp.kfold.ensemble import vote

        tables = []
        with self._lock:
            for model, adapter in self._models:
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


def decode_image(url: str, cfg: Config):
    """A data URL ("data:image/png;base64,...") -> RGB PIL image, resized as the run's samples are."""
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
        return resize_image(open_image(io.BytesIO(base64.b64decode(payload, validate=True))), cfg)
    except (binascii.Error, DataError) as e:
        raise RequestError(f"cannot decode the image in {header!r}: {e}", param="messages") from None


def request_sample(body: dict, cfg: Config, marker: str = "") -> dict:
    """OpenAI chat messages -> {id, images, messages (HF chat), rendered}, as `build_samples` makes."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages", param="messages")
    hf, images, texts = [], [], {"system": [], "user": []}
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
                images.append(decode_image(url, cfg))
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


def completion(body: dict, predictor: RunPredictor) -> dict:
    model = body.get("model")
    if model != predictor.name:
        # OpenAI and vLLM answer an unknown model with 404 model_not_found; so do we.
        raise RequestError(
            f"model {model!r} does not exist; this server hosts {predictor.name!r}",
            HTTPStatus.NOT_FOUND,
            param="model",
        )
    if body.get("stream"):
        raise RequestError("stream=true is not supported; ask without streaming", param="stream")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported: the answer is deterministic", param="n")
    choices = requested_choices(body, predictor.labels)
    content, p = predictor.answer(request_sample(body, predictor.cfg, predictor.marker), choices)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": predictor.name,
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
            card = {"id": self.server.predictor.name, "object": "model", "created": 0, "owned_by": "vlmexp"}
            self._json(HTTPStatus.OK, {"object": "list", "data": [card]})
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
            self._json(HTTPStatus.OK, completion(body, self.server.predictor))
        except RequestError as e:
            self._error(e)
        except Exception as e:  # a bug or a model failure: say so, keep serving
            log.exception("request failed")
            self._error(RequestError(f"{type(e).__name__}: {e}", HTTPStatus.INTERNAL_SERVER_ERROR))

    def _body(self) -> dict:
        size = int(self.headers.get("Content-Length") or 0)
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

    def __init__(self, address: tuple[str, int], predictor: RunPredictor):
        super().__init__(address, _Handler)
        self.predictor = predictor
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


def make_server(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, fold: int | None = None) -> _Server:
    """The server, bound but not yet serving (port 0 picks a free one); run it with serve_forever()."""
    predictor = RunPredictor(Path(run_dir), fold)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s: anyone who can reach it can use the model; there is no authentication", host
        )
    return _Server((host, port), predictor)


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


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, fold: int | None = None) -> None:
    """Serve until Ctrl-C: `exp serve runs/baseline-1a2b3c4d --port 8000`."""
    server = make_server(run_dir, host, port, fold)
    log.info("serving %s as model %r at %s (Ctrl-C stops)", run_dir, server.predictor.name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
