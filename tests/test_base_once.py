"""The base model loaded once per run (speed.reuse_base): same fold results as loading it per fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.tables import prob_columns, read_json, read_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=40, n_test=12)


def run(demo: Path, work: Path, reuse: bool, monkeypatch, *extra: str) -> tuple[Path, list[bool]]:
    """A 2-fold tiny run; returns its folder and, per base-model load, whether it came with LoRA."""
    import vlmexp.models.base_once as base_once
    import vlmexp.models.load as load
    from vlmexp.recipe import run_experiment

    loads: list[bool] = []
    real = load.load_model  # the module's own, not an earlier call's wrapper

    def counting(cfg, *, training=True, lora=True):
        loads.append(lora)
        return real(cfg, training=training, lora=lora)

    monkeypatch.setattr(base_once, "load_model", counting)
    real_inference = load.load_for_inference
    monkeypatch.setattr(base_once, "load_for_inference", lambda *a: loads.append(True) or real_inference(*a))
    cfg = load_config(
        [f"data.dir={demo}", f"runs_dir={work / 'runs'}", f"leaderboard={work / 'lb.csv'}",
         f"model.cache_dir={work.parent / 'tiny'}", "folds=2", "train.epochs=2", "train.eval=true",
         "train.batch_size=8", "predict.batch_size=8", "train.report_to=none", f"speed.reuse_base={reuse}",
         *extra]
    )  # fmt: skip
    return run_experiment(cfg).root, loads


# The demo experiment trains lm_head and the merger whole (lora.modules_to_save): peft's unload() left
# fold 0's trained copies on the shared base, so fold 1 started from them.
@pytest.mark.parametrize("extra", [(), ("lora.modules_to_save=[lm_head,merger]", "train.lr=5e-3")])
def test_shared_base_gives_the_same_folds_as_loading_per_fold(demo, tmp_path, monkeypatch, extra):
    shared, shared_loads = run(demo, tmp_path / "shared", True, monkeypatch, *extra)
    fresh, fresh_loads = run(demo, tmp_path / "fresh", False, monkeypatch, *extra)
    assert shared_loads == [False]  # one bare base for the whole run, adapters added per fold
    assert len(fresh_loads) == 4  # per fold: a load for training and another for prediction
    for k in range(2):
        a = read_table(shared / f"folds/fold{k}/oof.csv")
        b = read_table(fresh / f"folds/fold{k}/oof.csv")
        cols = [c for c in a.columns if c.startswith("p:")]
        assert cols == prob_columns([c[2:] for c in cols])
        assert a["id"].tolist() == b["id"].tolist()
        np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-5)
        assert a["pred"].tolist() == b["pred"].tolist()
        wa = load_file(shared / f"folds/fold{k}/adapter/adapter_model.safetensors")
        wb = load_file(fresh / f"folds/fold{k}/adapter/adapter_model.safetensors")
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)
    # the folds really differ: the shared base did not hand fold 1 fold 0's adapter
    w0 = load_file(shared / "folds/fold0/adapter/adapter_model.safetensors")
    w1 = load_file(shared / "folds/fold1/adapter/adapter_model.safetensors")
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)
    assert read_json(shared / "cv.json")["mean"] == pytest.approx(read_json(fresh / "cv.json")["mean"])


def test_a_fold_that_died_before_release_does_not_stack_adapters(tmp_path, tiny_models):
    """A Ray worker reuses its prepared run for the next fold; if the last fold raised before release(),
    the next fold must still get exactly one adapter on the bare base."""
    from vlmexp.models.base_once import BaseModel

    cfg = load_config([f"model.name={tiny_models('qwen2_vl')}", f"runs_dir={tmp_path}"])
    base = BaseModel(cfg)
    first = base.for_training(seed=0)
    n_lora = sum("lora_A" in n for n, _ in first.named_parameters())
    second = base.for_training(seed=1)  # no release() of `first`: its fold died
    assert sum("lora_A" in n for n, _ in second.named_parameters()) == n_lora
    assert not any("base_model.model.base_model" in n for n, _ in second.named_parameters())
    base.release(second)
