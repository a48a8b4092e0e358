"""engine/buckets.py: a run's batches meet few distinct widths, and the extra padding changes no loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmexp.config import Config
from vlmexp.engine.batching import pad_rows
from vlmexp.engine.buckets import bucket_width, widths
from vlmexp.engine.encode import Encoder
from vlmexp.engine.samples import build_samples
from vlmexp.engine.train import training_dataset
from vlmexp.engine.trainer import RowCollator
from vlmexp.models.load import load_model, load_processor
from vlmexp.prompts.render import load_template


def test_ladder_widths_cover_every_length_with_bounded_padding():
    for n in range(1, 5000):
        w = bucket_width(n)
        assert w >= n and w % 64 == 0
        if n > 256:
            assert (w - n) / n < 0.25, n
    assert len(widths(4096)) == 20
    assert [bucket_width(n) for n in (1, 300, 570, 1025)] == [64, 320, 640, 1280]


def test_a_runs_batches_meet_few_widths_with_buckets_and_many_without():
    # 5 folds x 2 epochs x 40 batches of 8 rows of ~600 +- 150 tokens (prompt length and image size vary)
    rng = np.random.default_rng(0)
    seen_buckets, seen_64 = set(), set()
    for _ in range(400):
        rows = []
        for n in rng.normal(600, 150, 8).clip(300, 2000):
            ids = torch.ones(int(n), dtype=torch.long)
            rows.append({"input_ids": ids, "attention_mask": ids.clone(), "labels": ids.clone()})
        seen_buckets.add(pad_rows(rows, 0, left=False, multiple=bucket_width)["input_ids"].shape[1])
        seen_64.add(pad_rows(rows, 0, left=False, multiple=64)["input_ids"].shape[1])
    ladder = [w for w in widths(2000) if w >= 300]  # 320, 384, ..., 1792, 2048: whatever the data
    assert len(ladder) == 12 and seen_buckets <= set(ladder)
    assert len(seen_64) > len(seen_buckets), (sorted(seen_64), sorted(seen_buckets))


def test_bucketed_padding_gives_the_same_loss(tiny_models, tmp_path):
    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    processor, model = load_processor(cfg), load_model(cfg, training=False)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": str(tmp_path / f"{i}.png"), "label": ["red", "green"][i % 2]})
    tpl = load_template("baseline")
    df, labels = pd.DataFrame(rows), ["red", "green"]
    samples = build_samples(df, labels=labels, descriptions={}, template=tpl, cfg=cfg)
    enc = Encoder(processor, cfg.train.max_length)
    enc.bind(model)
    examples = training_dataset(cfg, processor, samples)
    encoded = [enc.train_row(e) for e in examples]

    def loss(multiple) -> tuple[float, int]:
        batch = enc.pad_train(encoded, multiple=multiple)
        batch.pop("image_keys"), batch.pop("pixel_index")
        with torch.no_grad():
            return float(model(**batch).loss), batch["input_ids"].shape[1]

    plain, plain_width = loss(1)
    bucketed, bucketed_width = loss(bucket_width)
    assert bucketed_width == bucket_width(plain_width) > plain_width  # really padded further
    assert abs(bucketed - plain) < 1e-5

    # A short last batch (3 rows at batch 5) topped up with label-masked copies: same loss, full shape.
    collate = RowCollator(examples, enc, None, cfg.train.max_length, processor, bucket_width, fill_to=5)
    batch = collate([{"row": i} for i in range(3)])
    assert batch["input_ids"].shape == (5, bucketed_width)
    assert batch["image_grid_thw"].shape[0] == 5 and (batch["labels"][3:] == -100).all()
    batch.pop("image_keys"), batch.pop("pixel_index"), batch.pop("right_padded")
    with torch.no_grad():
        assert abs(float(model(**batch).loss) - plain) < 1e-5


def _prediction_setup(tiny_models, tmp_path, rows: int, step: int):
    """A tiny Qwen2-VL, its processor and `rows` prediction samples whose images grow by `step` px,
    so prompts of one batch pad to different widths."""
    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    processor, model = load_processor(cfg), load_model(cfg, training=False)
    rng = np.random.default_rng(rows)
    table = []
    for i in range(rows):
        Image.fromarray(rng.integers(0, 255, (40 + step * i, 56, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        table.append({"id": str(i), "image": str(tmp_path / f"{i}.png")})
    labels = ["red", "green", "blue"]
    samples = build_samples(
        pd.DataFrame(table), labels=labels, descriptions={}, template=load_template("baseline"), cfg=cfg,
        with_answer=False,
    )  # fmt: skip
    return cfg, processor, model, samples, labels


def test_prediction_runs_compiled_layers_eagerly_and_compiles_nothing(tiny_models, tmp_path):
    """A forward with a KV cache hands each compiled layer the whole cache, whose per-layer lengths
    differ, so dynamo recompiled per layer until its limit (run Q, H200). Prediction runs the layers
    eagerly: no frame is compiled, the table is the uncompiled one, training's compiled layers return."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vlmexp.engine.predict import predict
    from vlmexp.engine.run_caches import RunCaches

    cfg, processor, model, samples, labels = _prediction_setup(tiny_models, tmp_path, rows=5, step=8)
    cfg.predict.batch_size = 2
    plain = predict(
        cfg, model, processor, samples, labels, progress=False, caches=RunCaches.for_run(cfg, processor)
    )
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    torch._dynamo.reset()
    for layer in layers:  # as compile_blocks does, with dynamo's tracing only (no inductor on the CPU)
        layer.compile(backend="eager", dynamic=False)
        layer._vlmexp_compiled = True
    impls = [layer._compiled_call_impl for layer in layers]
    before = counters["frames"]["total"]
    table = predict(
        cfg, model, processor, samples, labels, progress=False, caches=RunCaches.for_run(cfg, processor)
    )
    assert counters["frames"]["total"] == before  # nothing traced or compiled while predicting
    assert [layer._compiled_call_impl for layer in layers] == impls  # compiled again for training
    cols = [c for c in plain.columns if c.startswith("p:")]
    np.testing.assert_allclose(table[cols].to_numpy(), plain[cols].to_numpy(), atol=1e-6)
    with torch.no_grad():  # outside prediction the layers are compiled: the counter does move
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert counters["frames"]["total"] > before
    torch._dynamo.reset()


def test_compiling_raises_dynamos_recompile_limit_for_the_runs_shapes():
    from vlmexp.engine.compile import RECOMPILE_LIMIT, compile_blocks

    class DecoderLayer(torch.nn.Linear):  # named like e.g. Qwen2VLDecoderLayer
        pass

    limits = torch._dynamo.config
    saved = limits.recompile_limit
    limits.recompile_limit = 8
    try:
        assert compile_blocks(torch.nn.Sequential(DecoderLayer(2, 2))) == 1
        assert limits.recompile_limit == RECOMPILE_LIMIT
    finally:
        limits.recompile_limit = saved


@pytest.mark.parametrize("dynamic", [True, False])
def test_compiled_training_pads_to_buckets_only_for_static_shapes(
    tiny_models, tmp_path, monkeypatch, dynamic
):
    """Dynamic compiled shapes (speed.compile_dynamic=true) take each batch as it is: padding
    to bucket widths and filling short batches would only add compute. Static ones need both."""
    from vlmexp.engine import speed
    from vlmexp.engine.trainer import build_trainer

    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    cfg.speed.compile, cfg.speed.compile_dynamic, cfg.train.batch_size = True, dynamic, 4
    monkeypatch.setattr(speed, "compiles", lambda model, cfg: True)  # as on CUDA, without compiling
    monkeypatch.setattr(speed, "prepare", lambda model, cfg, **kw: {})
    processor, model = load_processor(cfg), load_model(cfg, training=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((40, 56, 3), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": str(tmp_path / f"{i}.png"), "label": ["red", "green"][i % 2]})
    samples = build_samples(
        pd.DataFrame(rows),
        labels=["red", "green"],
        descriptions={},
        template=load_template("baseline"),
        cfg=cfg,
    )
    trainer = build_trainer(
        cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path / "out"
    )
    batch = trainer.data_collator([{"row": i} for i in range(3)])
    width = int(batch["attention_mask"].sum(1).max())  # the longest row's real tokens
    if dynamic:
        assert batch["input_ids"].shape == (3, width)
    else:
        assert batch["input_ids"].shape == (4, bucket_width(width)) and bucket_width(width) > width
