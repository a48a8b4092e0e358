"""speed.causal_only (engine/causal_only.py): a right-padded training batch runs without its padding mask
(so SDPA may pick its flash kernel on a GPU), with the loss and gradients of the masked batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from vlmexp.config import Config
from vlmexp.engine.causal_only import RIGHT_PADDED, right_padded, without_padding_mask
from vlmexp.engine.samples import build_samples
from vlmexp.engine.train import training_dataset
from vlmexp.engine.trainer import build_trainer
from vlmexp.models.load import load_model, load_processor
from vlmexp.models.tiny import FAMILIES
from vlmexp.prompts.render import load_template

LABELS = ["red", "green", "blue"]
# Families whose decoder layers then get no mask at all; Gemma's build one for bidirectional image
# attention from the image tokens whatever the padding mask, and still compute the same loss.
MASK_FREE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "smolvlm", "llava"}


def test_right_padded_reads_the_mask_on_the_cpu():
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert right_padded(torch.ones(2, 4, dtype=torch.long))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding needs its mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole: not padding, keep the mask
    assert not right_padded(None)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    d = tmp_path_factory.mktemp("causal")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):  # three image heights: rows of three lengths, so the batch pads
        Image.fromarray(rng.integers(0, 255, (40 + 16 * i, 56, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"id": str(i), "image": str(d / f"{i}.png"), "label": LABELS[i]})
    return pd.DataFrame(rows)


def _samples(table: pd.DataFrame, cfg: Config) -> list[dict]:
    return build_samples(table, labels=LABELS, descriptions={}, template=load_template("baseline"), cfg=cfg)


def _loss_and_grads(trainer, model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_right_padded_batch_without_its_mask_gives_the_same_loss_and_gradients(
    family, tiny_models, table, tmp_path
):
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    cfg.lora.r, cfg.lora.dropout = 4, 0.0
    cfg.train.batch_size, cfg.train.eval = 3, False
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    torch.manual_seed(0)
    model = load_model(cfg, training=True)
    for name, p in model.named_parameters():  # B = 0 at init: give the adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch.pop(RIGHT_PADDED) is True
    assert (batch["attention_mask"] == 0).any()  # really padded
    seen: list = []
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    spy = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    masked, masked_grads = _loss_and_grads(trainer, model, batch)
    with without_padding_mask(model):
        causal, causal_grads = _loss_and_grads(trainer, model, batch)
    spy.remove()
    assert seen[0] is not None  # the masked pass gave the layers a mask
    if family in MASK_FREE:
        assert seen[-1] is None
    assert abs(causal - masked) < 1e-5, (causal, masked)
    assert causal_grads.keys() == masked_grads.keys() and any("lora_A" in n for n in causal_grads)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(causal_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_trainer_step_drops_the_mask_only_for_a_marked_batch(tiny_models, table, tmp_path):
    cfg = Config()
    cfg.model.name = str(tiny_models("qwen2_vl"))
    cfg.train.batch_size, cfg.train.eval = 3, False
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    model = load_model(cfg, training=True)
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    assert trainer.causal_only  # the default
    trainer.current_gradient_accumulation_steps = 1  # set by the trainer's loop, which this test skips
    seen: list = []
    core = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    core.register_forward_pre_hook(lambda _m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    trainer.training_step(model, dict(batch))
    assert seen[-1] is None
    trainer.training_step(model, dict(batch, **{RIGHT_PADDED: False}))  # e.g. a left-padded batch
    assert seen[-1] is not None
    trainer.causal_only = False  # speed.causal_only=false
    trainer.training_step(model, dict(batch))
    assert seen[-1] is not None
    # the hook is gone after each step: a plain forward keeps its mask
    with torch.no_grad():
        trainer.compute_loss(model, {k: v for k, v in batch.items() if k != RIGHT_PADDED})
    assert seen[-1] is not None


@pytest.mark.gpu
def test_on_cuda_in_bf16_the_unmasked_step_keeps_the_loss(tiny_models, table, tmp_path):
    """On a GPU the unmasked batch takes SDPA's flash kernel instead of the memory-efficient one: the
    same loss within bf16 rounding."""
    cfg = Config()
    cfg.model.name, cfg.model.dtype = str(tiny_models("qwen2_5_vl")), "bfloat16"
    cfg.lora.dropout, cfg.train.batch_size, cfg.train.eval = 0.0, 3, False
    processor = load_processor(cfg)
    samples = _samples(table, cfg)
    model = load_model(cfg, training=True).cuda()
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch.pop(RIGHT_PADDED) is True
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        masked = trainer.compute_loss(model, dict(batch)).item()
        with without_padding_mask(model):
            causal = trainer.compute_loss(model, dict(batch)).item()
    assert abs(causal - masked) < 2e-2 * max(1.0, abs(masked)), (causal, masked)
