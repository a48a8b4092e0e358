"""Logits and cross-entropy only at supervised positions, for the bench's own training loops.

The plain path computes (batch x tokens x vocab) logits, e.g. 8 x 570 x 151936 in fp32 = 2.8 GB, to
use ~4 positions a sample; `answer_only_loss` applies the LM head only where a label is supervised,
equal in result. The project's trainer (`engine/train.py`) does not use it: its answer-only loss is
trl 1.16's own (`SFTTrainer` projects only supervised positions through the LM head on CUDA), so this
serves loops outside the trainer (the QLoRA memory bench, `bench/run.py` `qlora_memory`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmexp.models.parts import vlm_parts

IGNORE = -100


def answer_only_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: int | torch.Tensor | None = None,
    mm_encoder_outputs: dict | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `inputs["labels"]`, equal to `model(**inputs).loss` (mean over supervised
    tokens, or their sum / `num_items_in_batch` as transformers does under gradient accumulation), with
    the lm_head applied only where a label is supervised."""
    core, head = vlm_parts(model)
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    if mm_encoder_outputs is not None:
        batch.pop("pixel_values", None)
        batch["mm_encoder_outputs"] = mm_encoder_outputs
    hidden = core(**batch, use_cache=False).last_hidden_state
    targets = inputs["labels"][:, 1:].to(hidden.device)
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()  # (answer tokens, vocab), e.g. (32, 151936)
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / denom
