"""Activation memory of a training step, estimated: gradient checkpointing only when it would not fit.

Checkpointing recomputes every layer's forward during the backward pass to keep activations out of
memory: 1.75x the step time (Qwen2.5-VL-3B, batch 8: 19.1 vs 33.6 samples/s on an H200), pure cost
when the activations fit in free GPU memory anyway.
`gradient_checkpointing_needed` decides train.gradient_checkpointing=auto from `activation_bytes`, and
`engine/autobatch.py` picks train.batch_size=auto from the same estimate (engine/train_args.py logs
the decision). Both are per fold, from the fold's batch shape.
"""

from __future__ import annotations

import torch

from vlmexp.models.lora import classify
from vlmexp.models.parts import unwrap

# speed.compile's fused kernels keep fewer intermediates. Run K's compiled language-only steps peaked at
# 41 GiB (batch 16, estimate 61) and 58 GiB (batch 24, estimate 91), weights and optimizer included: at
# most 0.67 of the eager estimate. Fitted to those two points only. It decides checkpointing under
# compile (gradient_checkpointing_needed); `train.batch_size=auto` keeps the eager estimate, so compile
# does not change the batch (autobatch.choose: compile's estimate chose 32 and cost CV in run S).
COMPILED_FIT = 0.67


def activation_bytes(
    model: torch.nn.Module, batch_size: int, tokens: int, patches: int, compiled: bool = False
) -> int:
    """Training memory of one step without checkpointing, bf16: activations plus the trained weights'
    gradients and AdamW moments (12 bytes a weight: nothing for LoRA, ~45 GB for a full 3B model).
    `compiled`: the decoder layers run through speed.compile, activations x COMPILED_FIT.

    Activations per token and layer ~ 2 bytes x (16 hidden + 6 intermediate): fitted to the H200
    measurements in /work/shared/ENVIRONMENT.md (Qwen2.5-VL-3B, batch 8 x 570 tokens: ~30 GiB language,
    ~20 GiB more when the vision tower has adapters). The vision tower keeps activations only when it
    trains. `patches` is per sample (448 px in Qwen2.5-VL: 1024).
    """
    cfg = unwrap(model).config
    tc, vc = cfg.get_text_config(), getattr(cfg, "vision_config", None)
    total = 2 * (16 * tc.hidden_size + 6 * tc.intermediate_size) * tc.num_hidden_layers * tokens * batch_size
    total *= COMPILED_FIT if compiled else 1.0
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total += 12 * sum(p.numel() for _, p in trained)
    if vc is not None and any(classify(n)[0] == "vision" for n, _ in trained):
        d = getattr(vc, "embed_dim", None) or vc.hidden_size
        inter = getattr(vc, "intermediate_size", None) or d * getattr(vc, "mlp_ratio", 4)
        depth = getattr(vc, "depth", None) or vc.num_hidden_layers  # Qwen-VL: depth; CLIP/SigLIP: layers
        total += 2 * (16 * d + 6 * inter) * depth * patches * batch_size
    return int(total)


def free_gpu_bytes(device=None) -> int:
    """Bytes a new allocation can get on the GPU: what the driver reports free plus what torch's caching
    allocator holds unused. A run keeps its cache between folds (recipe.run_fold), so fold 1 sees the
    memory fold 0's activations left cached as free, as fold 0 saw it, and decides the same batch."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def gradient_checkpointing_needed(
    setting: str,
    model: torch.nn.Module,
    batch_size: int,
    tokens: int,
    patches: int,
    free_bytes: int | None = None,
    margin: float = 1.3,
    compiled: bool = False,
) -> tuple[bool, str]:
    """(use checkpointing?, why). `setting` is train.gradient_checkpointing: on, off or auto.
    auto: off on the CPU; on a GPU off when `margin` x the estimated activations fit in free memory."""
    if setting in ("on", "off"):
        return setting == "on", f"train.gradient_checkpointing={setting}"
    if free_bytes is None:
        if not torch.cuda.is_available():
            return False, "auto: CPU"
        free_bytes = free_gpu_bytes()
    need = activation_bytes(model, batch_size, tokens, patches, compiled)
    fits = need * margin <= free_bytes
    why = (
        f"auto: activations ~{need / 2**30:.1f} GiB x {margin} {'fit in' if fits else 'exceed'} "
        f"{free_bytes / 2**30:.1f} GiB free"
    )
    return not fits, why
