"""Right-padded training batches without their padding mask, so SDPA can run its flash kernel.

With a padding mask, transformers hands SDPA a 4D mask, and torch's flash kernel takes none: SDPA falls
back to the memory-efficient one (cutlass, built for sm80), which computes the masked upper triangle
too. Profiled on an H200 (3 cached steps of the 3B at batch 24, 640-token rows, `bench/gaps.py` run AB
in docs/performance.md), that kernel took 0.53 ms a layer forward and 1.59 ms backward: 17% of the
step's kernel time, for attention that is a few percent of its FLOPs. Without the mask (run AC, same
call, same rows): 48.0 -> 54.8 samples/s cached, 35.5% -> 42.0% MFU, peak 59.7 -> 56.2 GiB.

In a right-padded batch each real token attends to itself and the real tokens before it; the causal
mask alone already keeps the padding out of its view. Only the padding's own outputs change (they now
attend to the real tokens), and no real token reads them and their labels are -100, so the loss and
the gradients are those of the masked batch, up to float rounding (tests/test_causal_only.py, every
tiny family). Positions are unchanged too: Qwen-VL rows carry their 3D positions (`encode.Encoder`),
and the other families count each row's positions from 0, as right padding leaves them.

Training steps only: prediction pads its prompts on the left, where the mask is needed. The training
collator (`trainer.RowCollator`) marks a batch whose mask is ones-then-zeros in every row, checked on the
CPU before the batch goes to the GPU (a check there would wait for the GPU), and the trainer's step
drops the mask from the model's forward for that batch only (`speed.causal_only`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

RIGHT_PADDED = "right_padded"  # the collator's mark on a batch, popped by the trainer's step


def right_padded(mask: torch.Tensor | None) -> bool:
    """Whether every row of a (batch, tokens) mask is ones then zeros: [[1, 1, 0], [1, 1, 1]] -> True,
    a left-padded row [0, 1, 1] -> False. A CPU tensor, so no GPU wait."""
    if mask is None or mask.dim() != 2:
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


@contextmanager
def without_padding_mask(model: torch.nn.Module) -> Iterator[None]:
    """Forwards of `model` inside get attention_mask=None, whatever their caller passes (trl's
    compute_loss passes the batch's, and reads it afterwards for its token count)."""

    def drop(_module, args, kwargs):
        return args, kwargs | {"attention_mask": None}

    handle = model.register_forward_pre_hook(drop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
