"""The shared OpenAI-compatible client against a local fake server: secrets never leave, retries are
the openai client's own, replies that are not OpenAI JSON are named, and per-fold models get loaded."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vlmexp.config import load_config
from vlmexp.engine.openai_backend import predict_fold_openai, predict_openai
from vlmexp.openai_client import ServerError, chat, make_client, redact
from vlmexp.prompts.render import Rendered
from vlmexp.serve import running

FAKE_KEY = "sk-proj-NEVER-PRINT-ME-5c2e91"
LABELS = ["a", "b"]


class Fake:
    """What the fake server answers (status, content type, body text) and what it saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, json body)
        self.reply = lambda auth: (200, "application/json", "{}")
        self.models = ["m"]
        self.models_reply: tuple[int, str, str] | None = None  # instead of the model list, if set


@pytest.fixture
def fake():
    state = Fake()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            with state.lock:
                state.requests.append(("GET", self.path, {}))
            if state.models_reply:
                return self._send(*state.models_reply)
            cards = [{"id": m, "object": "model", "created": 0, "owned_by": "x"} for m in state.models]
            self._send(200, "application/json", json.dumps({"object": "list", "data": cards}))

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(("POST", self.path, body))
            if self.path == "/v1/load_lora_adapter":
                state.models.append(body["lora_name"])
                return self._send(200, "text/plain", "Success: LoRA adapter added successfully.")
            if self.path == "/v1/unload_lora_adapter":
                state.models.remove(body["lora_name"])
                return self._send(200, "text/plain", "Success: LoRA adapter removed successfully.")
            self._send(*state.reply(self.headers.get("Authorization", "")))

        def _send(self, status, ctype, text):
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("retry-after-ms", "5")  # the openai client's own backoff, kept short
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as srv:
        state.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        yield state


def _cfg(url: str, *extra: str):
    return load_config(["predict.backend=openai", f"predict.base_url={url}", "predict.model_per_fold=f{k}",
                        *extra])  # fmt: skip


def _samples(n: int = 2) -> list[dict]:
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a or b?"}]}]
    rendered = Rendered(system="", user="a or b?", answer="", marker="")
    return [{"id": f"s{i}", "images": [img], "messages": msg, "rendered": rendered} for i in range(n)]


def _completion(content: str) -> str:
    msg = {"role": "assistant", "content": content}
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})  # fmt: skip


def _posts(fake: Fake, path: str = "/v1/chat/completions") -> list[dict]:
    return [body for method, p, body in fake.requests if method == "POST" and p == path]


def test_an_echoed_key_never_reaches_errors_or_logs(fake, monkeypatch, caplog):
    """A proxy that echoes the Authorization header in its error body (issue 10, item 9): the openai
    backend used to raise it as it came, "invalid credentials: Bearer sk-..."."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)  # openai and httpx log requests and responses at DEBUG
    fake.reply = lambda auth: (500, "application/json", json.dumps({"error": {"message": f"bad key {auth}"}}))
    with pytest.raises(ServerError) as err:
        predict_openai(_cfg(fake.url), _samples(1), LABELS, model="m", concurrency=1, progress=False)
    assert len(_posts(fake)) == 3  # the openai client's own retries: max_retries=2 -> 3 requests
    assert "after 3 tries" in str(err.value) and "HTTP 500" in str(err.value)
    assert "Bearer ***" in str(err.value)  # the echo is still there, without the key
    text = str(err.value) + caplog.text + repr(err.getrepr())
    assert FAKE_KEY not in text and "sk-proj" not in text


def test_library_log_records_are_redacted(monkeypatch, caplog):
    monkeypatch.setenv("MY_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    # exp's CLI set-up (run by earlier tests in the same process) quiets these loggers to WARNING
    caplog.set_level(logging.DEBUG, logger="httpx")
    caplog.set_level(logging.DEBUG, logger="openai")
    make_client("http://127.0.0.1:9/v1", api_key_env="MY_KEY").close()  # installs the filters, learns the key
    logging.getLogger("httpx").debug("headers: %s", {"authorization": f"Bearer {FAKE_KEY}"})
    logging.getLogger("openai._base_client").debug("echo %s", FAKE_KEY)
    assert FAKE_KEY not in caplog.text and caplog.text.count("***") == 2


def test_a_secret_shaped_text_is_redacted_even_for_another_key():
    assert redact("Authorization: Bearer abc.def-123 and sk-live-XYZ987 api_key=hunter22") == (
        "Authorization: Bearer *** and *** api_key=***"
    )


@pytest.mark.parametrize(
    "reply",
    [
        (200, "text/html", "<html><body>502 Bad Gateway, Bearer sk-abcdef123</body></html>"),
        (200, "application/json", '{"choices": [{"index": 0, "mess'),  # cut short
        (200, "application/json", '{"object": "list", "data": []}'),  # JSON, but no choices
    ],
)
def test_a_reply_that_is_not_openai_json_names_the_server_and_what_came(fake, reply):
    fake.reply = lambda auth: reply
    with make_client(fake.url, max_retries=0) as client, pytest.raises(ServerError) as err:
        chat(client, model="m", messages=[{"role": "user", "content": "hi"}])
    message = str(err.value)
    assert fake.url in message and "not an OpenAI chat completion" in message
    assert reply[2][:25] in message  # what came back, its first characters
    assert "sk-abcdef123" not in message


def test_a_model_list_that_is_not_openai_json_is_named(fake):
    from vlmexp.engine.openai_backend import server_model

    fake.models_reply = (200, "text/html", "<html>login page</html>")
    with make_client(fake.url, max_retries=0) as client, pytest.raises(ServerError) as err:
        server_model(client, "")
    assert "not an OpenAI model list" in str(err.value) and "<html>login page" in str(err.value)


def test_a_fold_model_the_server_lacks_is_loaded_from_the_fold_adapter(fake, tmp_path):
    adapter = tmp_path / "folds/fold1/adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    fake.reply = lambda auth: (200, "application/json", _completion("b"))
    out = predict_fold_openai(_cfg(fake.url), _samples(), LABELS, run_name="r", k=1, adapter_dir=adapter,
                              concurrency=1, progress=False)  # fmt: skip
    assert out["pred"].tolist() == ["b", "b"]
    assert _posts(fake, "/v1/load_lora_adapter") == [{"lora_name": "f1", "lora_path": str(adapter.resolve())}]
    assert {body["model"] for body in _posts(fake)} == {"f1"}
    predict_fold_openai(_cfg(fake.url), _samples(), LABELS, run_name="r", k=1, adapter_dir=adapter,
                        progress=False)  # fmt: skip
    assert len(_posts(fake, "/v1/load_lora_adapter")) == 1  # the test rows after the OOF rows: loaded once
    time.sleep(0.01)
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")  # the fold again, e.g. --force
    predict_fold_openai(_cfg(fake.url), _samples(), LABELS, run_name="r", k=1, adapter_dir=adapter,
                        progress=False)  # fmt: skip
    assert _posts(fake, "/v1/unload_lora_adapter") == [{"lora_name": "f1"}]  # the old one under that name
    assert len(_posts(fake, "/v1/load_lora_adapter")) == 2


def test_a_server_that_cannot_load_adapters_gets_a_fix_in_the_error(fake, tmp_path):
    fake.reply = lambda auth: (200, "application/json", _completion("a"))
    with pytest.raises(ServerError, match="has no model 'f0'.*no LoRA adapter to load.*exp serve RUN"):
        predict_fold_openai(_cfg(fake.url), _samples(), LABELS, run_name="r", k=0,
                            adapter_dir=tmp_path / "missing", progress=False)  # fmt: skip
    assert _posts(fake) == []  # nothing was predicted by a wrong model


def test_the_cli_shows_a_server_error_as_one_line_not_a_traceback(capsys):
    import typer

    from vlmexp.cli import user_errors

    @user_errors
    def command():
        raise ServerError("http://127.0.0.1:9/v1/: the reply began '<html>Bearer sk-abcdef123'")

    with pytest.raises(typer.Exit) as exit_:
        command()
    out = capsys.readouterr().err
    assert exit_.value.exit_code == 2 and "error:" in out and "<html>Bearer ***" in out
    assert "Traceback" not in out and "sk-abcdef123" not in out
