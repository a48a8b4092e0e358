"""Finding a VLM's parts: the transformers model under a peft wrapper, and its language core and LM head.

Every speed lever works on the model's own modules (vision tower, decoder layers), whether or not a
LoRA adapter wraps it, so they all start from `unwrap`.
"""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vlm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(`.model`, `.lm_head`) of a *ForConditionalGeneration VLM: the vision + language core, whose
    forward gives hidden states, and the head that turns them into logits."""
    base = unwrap(model)
    core, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if core is None or head is None or not hasattr(core, "language_model"):
        raise TypeError(
            f"{type(base).__name__}: the fast path needs a *ForConditionalGeneration model with .model "
            "(vision + language) and .lm_head, e.g. Qwen2_5_VLForConditionalGeneration; use the plain path"
        )
    return core, head
