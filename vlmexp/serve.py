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

import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlmexp.serve_predictor import RunPredictor, completion
from vlmexp.serve_request import MAX_PIXELS, RequestError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 2**20  # a request holds a few base64 images; 64 MiB is far beyond that
# Connections the kernel queues while the accept loop is busy; the standard library's 5 dropped
# connections with 32 concurrent clients.
LISTEN_BACKLOG = 256
# A refused request's unread body: read and dropped up to 8 MiB (a slow client: 2 s between pieces).
DRAIN_BYTES, DRAIN_TIMEOUT_S = 8 * 2**20, 2.0


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
            if self.close_connection:  # the body was refused unread
                self._drain()
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

    def _drain(self) -> None:
        """Send our answer's end, then read and drop what the client still sends (bounded) before the
        connection closes: closing with unread input sends a TCP reset, and the client would see
        "connection reset by peer" instead of the 411/413 that says what to fix."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(DRAIN_TIMEOUT_S)
            left = DRAIN_BYTES
            while left > 0 and (chunk := self.connection.recv(min(2**16, left))):
                left -= len(chunk)
        except OSError:  # timed out, or the client is gone
            pass

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
