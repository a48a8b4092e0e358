"""Mid-fold checkpoints: a run killed with kill -9 inside a fold, after its first checkpoint, resumes
inside that fold and ends with the same tables as an uninterrupted run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.engine.train import last_checkpoint
from vlmexp.tables import read_json, read_table

pytestmark = pytest.mark.slow

# 24 rows, 2 folds: 12 training rows a fold, 3 steps an epoch at batch 4, 6 steps in all; a checkpoint
# every 2 steps (2, 4, 6) and after each evaluation (3, 6). The first, checkpoint-2, is inside epoch 1.
TINY = [
    "folds=2",
    "train.epochs=2",
    "train.batch_size=4",
    "train.save_every=2",
    "train.logging_steps=1",
    "train.lr=5e-3",
    "predict.batch_size=16",
]

# Runs `exp` with one extra trainer callback that stops dead at the first log after a checkpoint was
# written, so the test can kill -9 it there: mid-epoch, with a logged step the checkpoint lacks.
HOLD = """
import os, sys, time
from pathlib import Path
from transformers import TrainerCallback
import vlmexp.engine.train as train
from vlmexp.engine.trainer import build_trainer as build

class Hold(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}) and any(Path(args.output_dir).glob("checkpoint-*")):
            Path(os.environ["HOLD_MARKER"]).write_text(str(state.global_step))
            time.sleep(3600)

def build_and_hold(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(Hold())
    return trainer
train.build_trainer = build_and_hold  # where train_fold looks it up
from vlmexp.cli import app
app()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume")
    make_demo(d / "data", seed=0, n_train=24, n_test=12)
    return d


def overrides(work: Path, name: str) -> list[str]:
    return [
        *TINY,
        f"data.dir={work / 'data'}",
        f"runs_dir={work / 'runs'}",
        f"model.cache_dir={work / 'tiny'}",
        f"leaderboard={work / 'leaderboard.csv'}",
        f"name={name}",
    ]


def test_kill_9_mid_fold_resumes_inside_the_fold_with_the_same_tables(work, caplog):
    from vlmexp.recipe import run_experiment

    # Killed: fold 0 holds at step 3, after checkpoint-2 (mid-epoch), and dies by SIGKILL there.
    marker = work / "held_at"
    script = work / "hold.py"
    script.write_text(HOLD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "HOLD_MARKER": str(marker)}
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", *overrides(work, "killed")],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fold0 = work / "runs" / "killed" / "folds" / "fold0"
    assert marker.read_text() == "3"
    assert last_checkpoint(fold0 / "checkpoints").name == "checkpoint-2"
    assert not (fold0 / "done.json").exists()
    logged = [json.loads(line)["step"] for line in (fold0 / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]  # step 3 is logged but not in the checkpoint: the rerun redoes it

    # Rerun: resumes fold 0 from checkpoint-2 (not from step 0), then trains fold 1.
    with caplog.at_level(logging.INFO, logger="vlmexp.engine.train"):
        killed = run_experiment(load_config(overrides(work, "killed"))).root
    resumed = [r.getMessage() for r in caplog.records if "resuming fold training" in r.getMessage()]
    assert len(resumed) == 1 and resumed[0].endswith("checkpoint-2")  # fold 0 only; fold 1 starts afresh
    ref = run_experiment(load_config(overrides(work, "ref"))).root

    for table in ("oof.csv", "test_probs.csv", "folds/fold0/test.csv", "folds/fold1/test.csv"):
        a, b = read_table(ref / table), read_table(killed / table)
        assert a["pred"].tolist() == b["pred"].tolist(), table
        num = [c for c in a.columns if c.startswith("p:")]
        np.testing.assert_allclose(a[num].to_numpy(), b[num].to_numpy(), atol=1e-5, err_msg=table)
    cv_ref, cv_killed = read_json(ref / "cv.json"), read_json(killed / "cv.json")
    for key in ("mean", "std", "accuracy", "macro_f1", "n_oof", "config_hash"):
        assert cv_ref[key] == pytest.approx(cv_killed[key]), key
    assert (
        read_json(ref / "folds/fold0/metrics.json")["best_epoch"]
        == read_json(killed / "folds/fold0/metrics.json")["best_epoch"]
    )

    # log.jsonl reads like the uninterrupted run's: every step once, the same losses.
    def losses(run: Path) -> list[tuple[int, float]]:
        lines = (run / "folds/fold0/log.jsonl").read_text().splitlines()
        return [(e["step"], e["loss"]) for e in map(json.loads, lines) if "loss" in e]

    (ref_steps, ref_loss), (steps, loss) = zip(*losses(ref), strict=True), zip(*losses(killed), strict=True)
    assert steps == ref_steps == (1, 2, 3, 4, 5, 6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
    # A finished fold keeps its adapter and no checkpoints.
    assert (killed / "folds/fold0/adapter").is_dir() and not (killed / "folds/fold0/checkpoints").exists()


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path).name == "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # the broken ones removed
    assert last_checkpoint(tmp_path / "none") is None


def test_a_checkpoint_whose_optimizer_write_did_not_finish_is_not_resumed_from(tmp_path):
    # engine/async_save.py: the optimizer file is written after trainer_state.json, in the background;
    # a kill before its rename leaves optimizer.pt.tmp beside a complete-looking state.
    for step, pending in ((2, False), (4, True)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (d / ("optimizer.pt.tmp" if pending else "optimizer.pt")).write_bytes(b"x")
    assert last_checkpoint(tmp_path).name == "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_the_optimizer_file_is_written_off_the_main_thread_with_the_state_at_save_time(tmp_path):
    import threading

    import torch

    from vlmexp.engine import async_save

    writer = async_save.BackgroundWriter()
    threads = []
    real_save = torch.save
    release = threading.Event()

    def slow_save(obj, path):
        threads.append(threading.current_thread().name)
        release.wait(5)  # the main thread goes on (and changes the live state) meanwhile
        real_save(obj, path)

    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    at_save = {k: v.clone() for k, v in opt.state[param].items()}
    async_save.torch.save = slow_save
    try:
        writer.save(async_save.cpu_copy(opt.state_dict()), tmp_path / "optimizer.pt")
        assert (tmp_path / "optimizer.pt.tmp").exists() and not (tmp_path / "optimizer.pt").exists()
        opt.step()  # the next step updates the moments in place while the file is being written
        release.set()
        writer.wait()
    finally:
        async_save.torch.save = real_save
    assert threads == ["vlmexp-checkpoint"]
    saved = torch.load(tmp_path / "optimizer.pt", weights_only=True)["state"][0]
    for key, value in at_save.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    assert not torch.equal(saved["exp_avg"], opt.state[param]["exp_avg"])
    assert not (tmp_path / "optimizer.pt.tmp").exists()


def test_a_failed_background_write_is_raised(tmp_path):
    from vlmexp.engine.async_save import BackgroundWriter

    writer = BackgroundWriter()
    writer.save({"a": lambda: 1}, tmp_path / "optimizer.pt")  # a lambda does not pickle: fails in the thread
    with pytest.raises(RuntimeError, match="optimizer state failed"):
        writer.wait()
    assert not (tmp_path / "optimizer.pt").exists()  # never renamed: the checkpoint stays unfinished


def test_a_fold_trained_before_a_kill_is_not_trained_again(tiny_models, tmp_path):
    """Killed after its adapter was saved (e.g. while predicting): the rerun loads the saved weights
    instead of training again the epochs after the best one from its checkpoint."""
    import pandas as pd
    from PIL import Image
    from transformers import set_seed

    from vlmexp.config import Config
    from vlmexp.engine.predict import predict
    from vlmexp.engine.samples import build_samples
    from vlmexp.engine.train import train_fold
    from vlmexp.models.load import load_for_inference, load_model, load_processor
    from vlmexp.prompts.render import load_template

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    labels, rows = list(colours), []
    for i in range(12):
        Image.new("RGB", (48, 48), colours[labels[i % 4]]).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": str(tmp_path / f"{i}.png"), "label": labels[i % 4]})
    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    cfg.lora.r, cfg.lora.dropout = 8, 0.0
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_ratio = 2.0, 4, 5e-3, 0.0

    def samples(part: list[dict], with_answer: bool) -> list[dict]:
        out = build_samples(
            pd.DataFrame(part),
            labels=labels,
            descriptions={},
            template=load_template("baseline"),
            cfg=cfg,
            with_answer=with_answer,
        )
        return [dict(s, label=r["label"]) for s, r in zip(out, part, strict=True)]

    processor = load_processor(cfg)
    train, val = samples(rows[:8], True), samples(rows[8:], False)
    set_seed(0)
    first = train_fold(cfg, load_model(cfg, training=True), processor, train, val, labels, tmp_path / "f0")
    saved = predict(cfg, load_for_inference(cfg, first.adapter_dir), processor, val, labels, progress=False)

    set_seed(0)
    fresh = load_model(cfg, training=True)  # LoRA B starts at zero: the base model's outputs
    base = predict(cfg, fresh, processor, val, labels, progress=False)
    logs: list[dict] = []
    again = train_fold(cfg, fresh, processor, train, val, labels, tmp_path / "f0", on_log=logs.append)
    assert logs == []  # no training step and no evaluation ran
    assert (again.best_metric, again.best_epoch) == (first.best_metric, first.best_epoch)
    assert again.log_history == first.log_history
    reused = predict(cfg, fresh, processor, val, labels, progress=False)
    num = [c for c in saved.columns if c.startswith("p:")]
    assert np.abs(base[num].to_numpy() - saved[num].to_numpy()).max() > 1e-4  # training changed it
    np.testing.assert_allclose(reused[num].to_numpy(), saved[num].to_numpy(), atol=1e-5)
