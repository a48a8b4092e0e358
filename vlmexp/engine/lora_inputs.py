"""LoRA layers that take their input as it comes under autocast, instead of copying it to their fp32
weights' dtype: one switch for training steps (`trainer._SFTTrainer.training_step`) and prediction
(`predict.low_precision`).

This is `peft.helpers.disable_input_dtype_casting` over a list of layers found beforehand: peft's
helper walks every module on entry and again on exit, 3,361 modules of a LoRA-wrapped 3B, 14.1 ms of
host time a training step on a CI core against 1.3 ms for the list (docs/performance.md). A fold's
trainer finds its layers once; a prediction call once per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def peft_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft layer of `model` (LoRA linear, embedding, conv, quantised ones alike)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def no_input_cast(layers: list[BaseTunerLayer], active: bool = True) -> Iterator[None]:
    """Inside (when `active`), `layers` take their input in its own dtype; each layer's switch is
    restored after."""
    if not active:
        yield
        return
    saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            m.cast_input_dtype_enabled = value
