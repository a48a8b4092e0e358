"""speed.cudnn_attention (engine/speed.py `attention_backends`): every SDPA call of a run (training
steps, validation, prediction, the vision pre-pass) runs with cuDNN's backend off by default, and
with it on when asked; the same run's samples decode each image once (samples.ImageMemo); the
trainer's FLOP count equals transformers' own."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.engine import speed


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=24, n_test=12)


def _cfg(demo: Path, work: Path, *extra: str):
    return load_config(
        [f"data.dir={demo}", f"runs_dir={work / 'runs'}", f"leaderboard={work / 'lb.csv'}",
         f"model.cache_dir={work.parent / 'tiny'}", "folds=2", "train.epochs=1", "train.eval=true",
         "train.batch_size=8", "predict.batch_size=8", "train.report_to=none", *extra]
    )  # fmt: skip


def test_attention_backends_leave_out_cudnn_unless_asked():
    off = load_config(["speed.cudnn_attention=false"])
    on = load_config(["speed.cudnn_attention=true"])
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with speed.attention_backends(off):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after
    with speed.attention_backends(on):
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.slow
@pytest.mark.parametrize("cudnn", [False, True])
def test_every_sdpa_call_of_a_run_sees_the_chosen_backends(demo, tmp_path, monkeypatch, cudnn):
    from vlmexp.recipe import run_experiment

    seen: list[bool] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    run_experiment(_cfg(demo, tmp_path, f"speed.cudnn_attention={cudnn}"))
    assert len(seen) > 50  # the tiny model's layers in training, validation, prediction (76 seen)
    assert set(seen) == {cudnn}


@pytest.mark.slow
def test_a_run_decodes_each_image_once(demo, tmp_path, monkeypatch):
    import vlmexp.engine.samples as samples
    from vlmexp.recipe import run_experiment

    opened: Counter[str] = Counter()
    real = samples.open_image
    monkeypatch.setattr(samples, "open_image", lambda p: opened.update([str(p)]) or real(p))
    run_experiment(_cfg(demo, tmp_path))
    assert len(opened) == 24 + 12
    assert set(opened.values()) == {1}  # two folds: each training image was loaded for both before


def test_floating_point_ops_equal_transformers_and_count_parameters_once():
    from vlmexp.engine.trainer import _SFTTrainer

    class Model:
        main_input_name = "input_ids"
        calls = 0

        def num_parameters(self, exclude_embeddings=False):
            Model.calls += 1
            return 1234 if exclude_embeddings else 99999

    fake = SimpleNamespace(model=Model(), _n_params=None)
    batches = [{"input_ids": torch.zeros(3, 17, dtype=torch.long)}, {"input_ids": torch.zeros(2, 5)}]
    ours = [_SFTTrainer.floating_point_ops(fake, b) for b in batches]
    Model.calls = 0
    theirs = [Trainer.floating_point_ops(fake, b) for b in batches]
    assert ours == theirs == [6 * 51 * 1234, 6 * 10 * 1234]
    fake._n_params = None
    Model.calls = 0
    for b in batches * 3:
        _SFTTrainer.floating_point_ops(fake, b)
    assert Model.calls == 1
    assert _SFTTrainer.floating_point_ops(fake, {"pixel_values": torch.zeros(1)}) == 0
