"""Teacher reasons against a real OpenAI-format HTTP server on 127.0.0.1: retries, resume, secrecy."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from vlmexp.config import DataConfig
from vlmexp.data import load_competition
from vlmexp.reasons import ReasonsError, read_cache, reason_quality, reasons_for_competition, write_reasons
from vlmexp.serve import running

FAKE_KEY = "sk-test-DO-NOT-LEAK-7f3a9c"
LABELS = ["refund", "invoice"]
DESCRIPTIONS = {"refund": "Asking for money back.", "invoice": "A bill with tax."}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeTeacher:
    """What the server did: requests per image, statuses sent, most requests in flight at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # image sha -> requests
        self.statuses: list[int] = []
        self.prompts: dict[str, str] = {}  # image sha -> prompt text
        self.images: dict[str, bytes] = {}  # image sha -> decoded bytes
        self.auth: set[str] = set()
        self.in_flight = self.max_in_flight = 0
        self.transient = 2  # first request per image -> 500, second -> 429, then 200
        self.broken: set[str] = set()  # image shas that always get 500
        self.status_for_all: int | None = None  # e.g. 401 for every request

    def answer(self, body: dict, auth: str) -> tuple[int, dict, dict]:
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        data = base64.b64decode(url.split(",", 1)[1])
        sha = _sha(data)
        with self.lock:
            self.attempts[sha] += 1
            n = self.attempts[sha]
            self.prompts[sha], self.images[sha] = text, data
            self.auth.add(auth)
        if self.status_for_all:
            # Echo the credentials, as some proxies do: the client must redact them.
            return self.status_for_all, {}, {"error": {"message": f"invalid credentials: {auth}"}}
        if sha in self.broken or n <= self.transient:
            status = 429 if n == 2 and sha not in self.broken else 500
            # retry-after-ms: the openai client's own backoff waits 10 ms instead of 0.5 s, 1 s, ...
            return status, {"retry-after-ms": "10"}, {"error": {"message": "busy"}}
        reply = {"role": "assistant", "content": f"  Evidence\n for {sha[:8]}. "}
        return 200, {}, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip


@pytest.fixture
def server():
    teacher = FakeTeacher()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            with teacher.lock:
                teacher.in_flight += 1
                teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
            try:
                time.sleep(0.05)  # long enough for concurrent requests to overlap
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    status, headers, payload = 404, {}, {"error": {"message": f"no route {self.path}"}}
                else:
                    status, headers, payload = teacher.answer(body, self.headers.get("Authorization", ""))
                with teacher.lock:
                    teacher.statuses.append(status)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                with teacher.lock:
                    teacher.in_flight -= 1

        def log_message(self, *args):  # keep test output quiet
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as httpd:  # stopped and joined after
        teacher.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        yield teacher


@pytest.fixture
def train(tmp_path) -> pd.DataFrame:
    """Four rows with distinct images (a different colour each)."""
    rows = []
    for i in range(4):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), (60 * i, 10, 200 - 40 * i)).save(path)
        rows.append({"id": f"r{i}", "image": str(path), "label": LABELS[i % 2]})
    return pd.DataFrame(rows)


def _shas(train: pd.DataFrame) -> list[str]:
    return [_sha(Path(p).read_bytes()) for p in train["image"]]


def _run(server, train, out, **kw):
    kw = {"concurrency": 2, "max_retries": 3, "timeout_s": 10, "progress": False} | kw
    return write_reasons(train, LABELS, DESCRIPTIONS, base_url=server.base_url, model="teacher-1",
                         out_jsonl=out, **kw)  # fmt: skip


def test_retries_bounded_concurrency_images_and_gold_label(server, train, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)  # openai and httpx log requests at DEBUG: the key must not show
    out = tmp_path / "reasons.jsonl"
    df = _run(server, train, out)
    shas = _shas(train)
    assert df["id"].tolist() == ["r0", "r1", "r2", "r3"]
    assert df["reason"].tolist() == [f"Evidence for {s[:8]}." for s in shas]  # whitespace collapsed
    assert all(server.attempts[s] == 3 for s in shas)  # 500, 429, then 200: the openai client's retries
    assert Counter(server.statuses) == {500: 4, 429: 4, 200: 4}
    assert 2 <= server.max_in_flight <= 2  # concurrent, and never above concurrency=2
    for s, path, label in zip(shas, train["image"], train["label"], strict=True):
        assert server.images[s] == Path(path).read_bytes()
        assert f"The correct label is {label} ({DESCRIPTIONS[label]})" in server.prompts[s]
    assert server.auth == {f"Bearer {FAKE_KEY}"}  # the key from the environment was sent ...
    assert FAKE_KEY not in out.read_text() and FAKE_KEY not in caplog.text  # ... and never written
    assert df.attrs["stats"]["asked"] == 4


def test_resume_asks_only_for_missing_rows(server, train, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    out = tmp_path / "reasons.jsonl"
    shas = _shas(train)
    server.transient = 0
    server.broken = {shas[1], shas[3]}
    with pytest.raises(ReasonsError, match="2 of 4 reasons failed") as err:
        _run(server, train, out, max_retries=1)
    assert FAKE_KEY not in str(err.value)
    assert len(read_cache(out)) == 2
    with out.open("a") as f:
        f.write('{"key": "cut short by a kil')  # a kill in the middle of a line
    server.broken = set()
    server.attempts.clear()
    df = _run(server, train, out)
    assert dict(server.attempts) == {shas[1]: 1, shas[3]: 1}  # only the two missing rows were asked
    assert df["reason"].tolist() == [f"Evidence for {s[:8]}." for s in shas]
    assert len(read_cache(out)) == 4
    server.attempts.clear()
    again = _run(server, train, out)
    assert not server.attempts and again.attrs["stats"] == again.attrs["stats"] | {"cached": 4, "asked": 0}
    _run(server, train, out, prompt="Label: {label}. Why?")  # another prompt is another question
    assert sum(server.attempts.values()) == 4
    assert "Label: invoice. Why?" in server.prompts.values()


def test_fatal_status_stops_and_redacts_the_key(server, train, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MY_TEACHER_KEY", FAKE_KEY)
    caplog.set_level(logging.DEBUG)
    server.status_for_all = 401
    out = tmp_path / "reasons.jsonl"
    with pytest.raises(ReasonsError, match="HTTP 401") as err:
        _run(server, train, out, concurrency=1, api_key_env="MY_TEACHER_KEY")
    assert sum(server.attempts.values()) == 1  # a wrong key fails every row: stop after the first
    assert "***" in str(err.value) and FAKE_KEY not in str(err.value) and FAKE_KEY not in caplog.text
    assert not out.exists() or FAKE_KEY not in out.read_text()


def test_refuses_test_data_and_bad_prompts(train, tmp_path):
    with pytest.raises(ReasonsError, match="looks like test data"):
        write_reasons(train.drop(columns="label"), LABELS, DESCRIPTIONS, base_url="http://127.0.0.1:9/v1",
                      model="m", out_jsonl=tmp_path / "r.jsonl")  # fmt: skip
    with pytest.raises(ReasonsError, match=r"must contain \{label\}"):
        write_reasons(train, LABELS, DESCRIPTIONS, base_url="http://127.0.0.1:9/v1", model="m",
                      out_jsonl=tmp_path / "r.jsonl", prompt="Describe the image.")  # fmt: skip
    with pytest.raises(ReasonsError, match="not in labels.json"):
        bad = train.assign(label=["refund", "cat", "refund", "invoice"])
        write_reasons(bad, LABELS, DESCRIPTIONS, base_url="http://127.0.0.1:9/v1", model="m",
                      out_jsonl=tmp_path / "r.jsonl")  # fmt: skip
    assert not (tmp_path / "r.jsonl").exists()


def test_reason_quality_counts_restating_and_near_duplicates():
    reasons = [
        "This is a refund.",  # only restates a label
        "The page shows a refund amount and a reason box.",
        "The page shows a refund amount and a reason box!",  # near-copy of the one before
        "A table of taxes with an invoice number at the top.",
        "",
    ]
    q = reason_quality(reasons, LABELS)
    assert (q["n"], q["empty"], q["label_restating"], q["near_duplicate"]) == (4, 1, 1, 2)


def test_reasons_for_competition_writes_a_train_csv_with_reasons(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    server.transient = 0
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 30, 30)).save(data / "img" / f"{i}.png")
    (data / "labels.json").write_text(json.dumps(DESCRIPTIONS))
    (data / "train.csv").write_text(
        "image,label,extra\nimg/0.png,refund,a\nimg/1.png,invoice,b\nimg/2.png,refund,c\n"
    )
    (data / "test.csv").write_text("id,image\nt0,img/0.png\n")
    stats = reasons_for_competition(DataConfig(dir=str(data)), base_url=server.base_url, model="teacher-1",
                                    progress=False)  # fmt: skip
    assert stats["asked"] == 3 and Path(stats["out_jsonl"]) == data / "reasons.jsonl"
    comp = load_competition(DataConfig(dir=str(data), train_csv="train_with_reasons.csv"))
    assert comp.train["reason"].str.startswith("Evidence for").all()
    assert comp.train["extra"].tolist() == ["a", "b", "c"]
    assert stats["quality"]["n"] == 3
