"""`exp serve` and `predict.backend=openai`: served answers equal local prediction on a tiny model.

The run folder is built here: two folds, each an untrained LoRA adapter whose B matrices get
seeded random values, so the two folds disagree and the fold ensemble differs from either fold.
Labels are single letters ("a".."d") so that each is one token: with the demo's labels a random
tiny model always prefers the shortest one, and every prediction would be the same label.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmexp.config import load_config
from vlmexp.engine.openai_backend import predict_openai, to_openai_messages
from vlmexp.openai_client import make_client
from vlmexp.tables import prob_columns, probs

LABELS = {"a": "first kind", "b": "second kind", "c": "third kind", "d": "fourth kind"}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def comp_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / f"images/t{i}.png")
    pd.DataFrame({"id": [f"t{i}" for i in range(8)], "image": [f"images/t{i}.png" for i in range(8)]}).to_csv(
        root / "test.csv", index=False
    )
    pd.DataFrame({"image": [f"images/t{i}.png" for i in range(8)], "label": list("abcdabcd")}).to_csv(
        root / "train.csv", index=False
    )
    (root / "labels.json").write_text(json.dumps(LABELS))
    return root


@pytest.fixture(scope="module")
def run(comp_dir, tiny_models, tmp_path_factory):
    """(cfg, run folder, labels, test samples, [fold 0 table, fold 1 table]) from local prediction."""
    import torch

    from vlmexp.data import load_competition
    from vlmexp.engine.predict import predict
    from vlmexp.engine.samples import build_samples
    from vlmexp.models.load import load_for_inference, load_model, load_processor
    from vlmexp.prompts.render import load_template
    from vlmexp.rundir import RunDir

    work = tmp_path_factory.mktemp("work")
    cfg = load_config(
        [f"data.dir={comp_dir}", f"model.name={tiny_models('qwen2_vl')}", f"runs_dir={work}", "name=tiny",
         "folds=2", "predict.batch_size=8"]
    )  # fmt: skip
    template = load_template(cfg.prompt)
    rundir = RunDir.for_config(cfg)
    rundir.start(cfg, template.sources)
    for k in range(2):
        torch.manual_seed(k)
        model = load_model(cfg, training=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        model.save_pretrained(rundir.fold_dir(k) / "adapter")
        rundir.mark_fold_done(k, {"fold": k})
    comp = load_competition(cfg.data)
    samples = build_samples(comp.test, labels=comp.labels, descriptions=comp.descriptions, template=template,
                            cfg=cfg, with_answer=False)  # fmt: skip
    processor = load_processor(cfg)
    tables = []
    for k in range(2):
        model = load_for_inference(cfg, rundir.fold_dir(k) / "adapter")
        tables.append(predict(cfg, model, processor, samples, comp.labels, progress=False))
    return cfg, rundir.root, comp.labels, samples, tables


@pytest.fixture(scope="module")
def server(run):
    """`exp serve` on the fold ensemble, on a free port; shut down after the module."""
    from vlmexp.serve import make_server, running

    with running(make_server(run[1], host="127.0.0.1", port=0)) as srv:
        yield srv


def openai_cfg(cfg, url: str):
    return dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, backend="openai", base_url=url))


def http(url: str, body: dict | list | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_local_folds_are_a_real_test(run):
    _, _, labels, _, (t0, t1) = run
    assert t0["pred"].nunique() >= 2  # not one constant label
    assert (t0["pred"] != t1["pred"]).any()  # the folds disagree, so the ensemble is not one fold


def test_served_ensemble_equals_local_fold_vote(run, server):
    from vlmexp.kfold.ensemble import vote

    cfg, _, labels, samples, tables = run
    local = vote(tables, labels, how=cfg.ensemble.vote)
    with make_client(server.url, timeout=TIMEOUT_S) as client:
        served = predict_openai(openai_cfg(cfg, server.url), samples, labels, model="tiny", progress=False,
                                client=client)  # fmt: skip
    assert list(served.columns) == ["id", "pred", *prob_columns(labels), "raw"]
    assert served["id"].tolist() == local["id"].tolist()
    assert served["pred"].tolist() == local["pred"].tolist()
    np.testing.assert_allclose(probs(served, labels), probs(local, labels), atol=1e-5)


def test_served_single_fold_equals_local_fold(run):
    from vlmexp.serve import make_server, running

    cfg, root, labels, samples, tables = run
    with running(make_server(root, port=0, fold=1)) as srv, make_client(srv.url, timeout=TIMEOUT_S) as client:
        assert http(srv.url + "/models")[1]["data"][0]["id"] == "tiny/fold1"
        served = predict_openai(openai_cfg(cfg, srv.url), samples, labels, progress=False, client=client)
    assert served["pred"].tolist() == tables[1]["pred"].tolist()


def test_models_lists_the_ensemble_and_every_fold(server):
    status, body = http(server.url + "/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny", "tiny/fold0", "tiny/fold1"]


def test_each_fold_predicted_through_its_served_name_equals_local_fold_prediction(run, server):
    """Issue 10, item 8: with predict.backend=openai every fold's rows went to the one model at base_url,
    so the CV was not out-of-fold. Fold k now asks fold k's model, "{run}/fold{k}" on `exp serve`."""
    from vlmexp.engine.openai_backend import predict_fold_openai

    cfg, _, labels, samples, tables = run
    cfg = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, model_per_fold="{run}/fold{k}"))
    with make_client(server.url, timeout=TIMEOUT_S) as client:
        for k in range(2):
            served = predict_fold_openai(openai_cfg(cfg, server.url), samples, labels, run_name="tiny", k=k,
                                         progress=False, client=client)  # fmt: skip
            assert served["pred"].tolist() == tables[k]["pred"].tolist()
            np.testing.assert_allclose(probs(served, labels), probs(tables[k], labels), atol=1e-5)


def test_the_recipe_asks_each_fold_its_own_served_model(run, server):
    """recipe._predict, as run_fold calls it for fold k's OOF rows, with backend=openai and exp serve."""
    from vlmexp.recipe import _predict
    from vlmexp.rundir import RunDir

    cfg, root, labels, samples, tables = run
    cfg = openai_cfg(cfg, server.url)
    cfg = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, model_per_fold="{run}/fold{k}"))
    for k in range(2):
        got = _predict(cfg, None, None, samples, labels, fold=(RunDir(root), k))
        assert got["pred"].tolist() == tables[k]["pred"].tolist()
    with pytest.raises(ValueError, match="one fold's rows at a time"):
        _predict(cfg, None, None, samples, labels)


def test_backend_openai_without_a_model_per_fold_is_refused(comp_dir):
    from vlmexp.config import ConfigError

    base = [f"data.dir={comp_dir}", "predict.backend=openai", "predict.base_url=http://127.0.0.1:8000/v1"]
    with pytest.raises(ConfigError, match="would not be out-of-fold.*model_per_fold"):
        load_config(base)
    with pytest.raises(ConfigError, match="needs one model per fold"):
        load_config([*base, "predict.model_per_fold=one-model"])  # no {k}: every fold the same model
    with pytest.raises(ConfigError, match="only placeholders are"):
        load_config([*base, "predict.model_per_fold=fold{k}-{name}"])


def test_guided_choice_restricts_the_answer(run, server):
    from vlmexp.kfold.ensemble import vote

    cfg, _, labels, samples, tables = run
    mean = probs(vote(tables, labels), labels)[0]
    best = labels[int(np.argmax(mean))]
    choices = [label for label in labels if label != best][:2]  # the unconstrained answer is excluded
    want = choices[int(np.argmax([mean[labels.index(c)] for c in choices]))]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        status, body = http(
            server.url + "/chat/completions",
            {"model": "tiny", "messages": to_openai_messages(samples[0]), "temperature": 0, **extra},
        )
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == want
        assert sum(body["vlmexp_probs"][c] for c in choices) == pytest.approx(1.0)


def test_bad_requests_get_openai_errors(run, server):
    _, _, _, samples, _ = run
    messages = to_openai_messages(samples[0])
    text_only = [m if m["role"] != "user" else {"role": "user", "content": "which label?"} for m in messages]
    remote = json.loads(json.dumps(messages).replace("data:image/png;base64,", "http://example.com/a#", 1))
    cases = [
        ({"model": "tiny", "messages": text_only}, 400, "no image"),
        ({"model": "tiny", "messages": remote}, 400, "data URL"),
        ({"model": "other", "messages": messages}, 404, "does not exist"),
        ({"model": "tiny", "messages": messages, "guided_choice": ["zebra"]}, 400, "not labels"),
        ({"model": "tiny", "messages": []}, 400, "messages"),
    ]
    for body, want_status, want_text in cases:
        status, reply = http(server.url + "/chat/completions", body)
        assert status == want_status, reply
        assert want_text in reply["error"]["message"]
    status, reply = http(server.url + "/completions", {"model": "tiny", "prompt": "x"})
    assert status == 404 and "/v1/chat/completions" in reply["error"]["message"]
    status, reply = http(server.url + "/chat/completions", ["not", "an", "object"])
    assert status == 400 and "JSON object" in reply["error"]["message"]


def test_to_openai_messages_round_trips_to_the_same_sample(run):
    from vlmexp.serve_request import request_sample

    cfg, _, _, samples, _ = run
    s = samples[3]
    back = request_sample({"messages": to_openai_messages(s)}, cfg, s["rendered"].marker)
    assert back["messages"] == s["messages"]
    assert [np.asarray(i).tolist() for i in back["images"]] == [np.asarray(i).tolist() for i in s["images"]]


class _NoGuidedChoice(BaseHTTPRequestHandler):
    """A server like OpenAI's own API: refuses vLLM's guided-choice fields; answers in free text."""

    answers = iter(["B.", "no idea"])
    guided_seen = 0

    def do_GET(self):  # noqa: N802
        self._send(200, {"object": "list", "data": [{"id": "m", "object": "model", "created": 0}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "guided_choice" in body:
            type(self).guided_seen += 1
            return self._send(400, {"error": {"message": "Unrecognized request argument: guided_choice"}})
        msg = {"role": "assistant", "content": next(self.answers)}
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})  # fmt: skip

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_server_without_guided_choice_is_asked_again_and_parsed(run):
    cfg, _, labels, samples, _ = run
    from vlmexp.serve import running

    with running(ThreadingHTTPServer(("127.0.0.1", 0), _NoGuidedChoice)) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        with make_client(url, timeout=TIMEOUT_S) as client:
            out = predict_openai(openai_cfg(cfg, url), samples[:2], labels, concurrency=1, progress=False,
                                 client=client)  # fmt: skip
    assert _NoGuidedChoice.guided_seen == 1  # refused once, then never sent again
    assert out["pred"].iloc[0] == "b" and pd.isna(out["pred"].iloc[1])
    np.testing.assert_array_equal(probs(out, labels), [[0, 1, 0, 0], [0, 0, 0, 0]])
    assert out["raw"].tolist() == ["B.", "no idea"]


class _Recorder(_NoGuidedChoice):
    """Accepts every field and keeps each request body."""

    bodies: list = []

    def do_POST(self):  # noqa: N802
        type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        msg = {"role": "assistant", "content": "Reason: x\nLabel: b"}
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})  # fmt: skip


def test_every_request_asks_for_the_non_thinking_template_and_label_prompts_for_guided_choice(run):
    """A Qwen3.5 server renders "<think>" unless told otherwise; the folds were trained non-thinking."""
    import dataclasses

    from vlmexp.serve import running

    cfg, _, labels, samples, _ = run
    reasoning = dataclasses.replace(samples[1]["rendered"], marker="Label: ")
    asked = [samples[0], {**samples[1], "rendered": reasoning}]
    with running(ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        with make_client(url, timeout=TIMEOUT_S) as client:
            predict_openai(openai_cfg(cfg, url), asked, labels, concurrency=1, progress=False, client=client)
    label_only, reason = _Recorder.bodies
    assert label_only["chat_template_kwargs"] == reason["chat_template_kwargs"] == {"enable_thinking": False}
    assert label_only["guided_choice"] == labels and "guided_choice" not in reason


def test_close_joins_handler_threads_despite_an_idle_keepalive_client(run):
    """Issue 15: a handler thread left running at exit frees the model after Python stops handing out
    the GIL, and the process aborts (rc 134) after every test passed. Closing must join them all."""
    import http.client

    from vlmexp.serve import make_server

    srv = make_server(run[1], port=0, fold=0)
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=TIMEOUT_S)
    conn.request("GET", "/v1/models")
    assert conn.getresponse().read()  # the connection stays open: its handler waits for a next request
    try:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
        left = [t.name for t in threading.enumerate() if "process_request_thread" in t.name]
        assert left == [], f"handler threads still running after server_close: {left}"
        assert srv.predictor is None  # models released on the closing thread
    finally:
        conn.close()
