"""engine/buckets.py: a run's batches meet few distinct widths, and the extra padding changes no loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from vlmexp.config import Config
from vlmexp.engine.buckets import bucket_width, width_rule, widths
from vlmexp.engine.encode import Encoder, pad_rows
from vlmexp.engine.samples import build_samples
from vlmexp.engine.train import RowCollator, training_dataset
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
    batch.pop("image_keys"), batch.pop("pixel_index")
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


def test_bucketed_prompt_widths_give_the_same_probabilities(tiny_models, tmp_path, monkeypatch):
    from vlmexp.engine.encode import RunCaches
    from vlmexp.engine.predict import predict

    cfg, processor, model, samples, labels = _prediction_setup(tiny_models, tmp_path, rows=4, step=8)
    plain = predict(
        cfg, model, processor, samples, labels, progress=False, caches=RunCaches.for_run(cfg, processor)
    )
    widths_seen = []
    pad_prompts = Encoder.pad_prompts

    def spy(self, rows, skip_pixels=frozenset(), multiple=1):
        out = pad_prompts(self, rows, skip_pixels, multiple)
        widths_seen.append(out["input_ids"].shape[1])
        return out

    assert width_rule(model) == 1  # eager layers: no extra padding
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net[0]._vlmexp_compiled = True  # as compile.compile_blocks marks a compiled layer
    assert width_rule(net) is bucket_width
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    layer._vlmexp_compiled = True  # marked as compiled (on the CPU predict compiles nothing itself)
    assert width_rule(model) is bucket_width
    monkeypatch.setattr(Encoder, "pad_prompts", spy)
    padded = predict(
        cfg, model, processor, samples, labels, progress=False, caches=RunCaches.for_run(cfg, processor)
    )
    assert widths_seen and all(w == bucket_width(w) for w in widths_seen)
    cols = [c for c in plain.columns if c.startswith("p:")]
    np.testing.assert_allclose(padded[cols].to_numpy(), plain[cols].to_numpy(), atol=1e-5)
    assert (padded["pred"] == plain["pred"]).all()


def test_compiled_prediction_tops_up_short_batches_and_drops_the_copies(tiny_models, tmp_path):
    """11 rows at batch 4: the last batch (3 rows) is topped up to 4, so compiled layers meet one batch
    shape (run O hit dynamo's recompile limit in validation); the table is the eager one, once per id."""
    from vlmexp.engine.encode import RunCaches
    from vlmexp.engine.predict import predict

    cfg, processor, model, samples, labels = _prediction_setup(tiny_models, tmp_path, rows=11, step=4)
    cfg.predict.batch_size = 4
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    batch_dims: set[int] = set()

    def run(compiled: bool):
        for layer in layers:
            layer._vlmexp_compiled = compiled  # as compile.compile_blocks marks it; the CPU compiles nothing
        batch_dims.clear()
        return predict(
            cfg, model, processor, samples, labels, progress=False, caches=RunCaches.for_run(cfg, processor)
        )

    hook = layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: batch_dims.add((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True,
    )
    plain = run(False)
    assert batch_dims == {3, 4}  # eager: the short batch as it is
    filled = run(True)
    hook.remove()
    assert batch_dims == {4}
    assert filled["id"].tolist() == [str(i) for i in range(11)]
    cols = [c for c in plain.columns if c.startswith("p:")]
    np.testing.assert_allclose(filled[cols].to_numpy(), plain[cols].to_numpy(), atol=1e-5)


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
