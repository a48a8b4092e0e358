"""Prediction with each LoRA adapter folded into a copy of its base weight, the base left untouched.

Unmerged, every adapted linear layer runs its base matmul plus the adapter's two thin matmuls, a
scaling multiply and an add over the layer's whole output: for a 3B's gate/up projections that is
tokens x 11008 values read and written twice more per layer. In the 3B's cached prediction profile
(run AB, docs/performance.md) elementwise `mul`/`add`/`copy` took 19% of the kernel time. With the
adapter folded in (W' = W + scale * B @ A, one addmm per layer, summed in fp32, stored in the weight's
dtype) a layer is one matmul, as merged inference servers run it.

Why a copy rather than peft's `merge()`/`unmerge()`: those add and subtract the delta in place, and in
bf16 W + d - d is not W. With `speed.reuse_base` every fold's adapter sits on the one base loaded per
run, so an in-place round trip would drift the base a little with each fold and prediction. Here each
layer's base weight is swapped for a merged tensor during the pass and the original tensor object is
put back after it: the base is bit-for-bit what it was, and nothing the optimizer holds changes.

The merged copy costs the adapted weights' memory once more (5.5 GB for a 3B's language model with
every linear adapted) for the pass; where that does not fit in free GPU memory with room to spare,
prediction runs unmerged. Only plain LoRA on plain `nn.Linear` layers is merged; DoRA and other variants,
quantised (bitsandbytes), offloaded or FSDP-sharded layers and several active adapters run unmerged.

Scores are those of the unmerged model up to the rounding of W' to bf16 (CPU fp32: equal to 1e-5,
tests/test_lora_merge.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from vlmexp.engine.memory import free_gpu_bytes

log = logging.getLogger(__name__)

# Free memory kept for the pass itself beyond the merged copies: a 3B batch of 32 prompts needs ~2 GiB
# of activations and KV cache (logits_to_keep=1); 4 GiB plus a tenth of what is free covers larger ones.
_HEADROOM_BYTES = 4 << 30

# Merging costs a pass over every adapted weight (about 85 ms a call on the 3B under py-spy, run AD),
# paid back by the adapters' elementwise work it saves per image: an 80-image validation call was 0.19 s
# faster merged (run AF). A call of a few images, e.g. `exp serve` answering one request per fold
# adapter, would pay more than it saves, so smaller calls run unmerged.
MIN_SAMPLES = 32


def mergeable_layers(model: torch.nn.Module) -> list[LoraLinear]:
    """The model's LoRA layers that fold into their base weight: plain LoRA (no DoRA or other variant),
    one active adapter, not merged already, on a floating-point `nn.Linear`."""
    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLinear) or module.disable_adapters or module.merged:
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        base = module.get_base_layer()
        if (
            len(active) != 1
            or active[0] in module.lora_variant
            or module.fan_in_fan_out  # a (in, out) weight, e.g. GPT-2's Conv1D
            or module.lora_B[active[0]].bias is not None  # peft's lora_bias: a bias to fold as well
            or type(base) is not torch.nn.Linear
            or not base.weight.is_floating_point()
            or base.weight.is_meta  # offloaded by accelerate's hooks: the weight lives elsewhere
            # sharded by FSDP: a DTensor, or a flat shard of another shape than (out, in)
            or type(base.weight.data) is not torch.Tensor
            or tuple(base.weight.shape) != (base.out_features, base.in_features)
        ):
            return []  # one layer that cannot fold would mix merged and unmerged layers: keep it simple
        layers.append(module)
    return layers


def _fits(layers: list[LoraLinear]) -> bool:
    weights = [m.get_base_layer().weight for m in layers]
    device = weights[0].device
    if device.type != "cuda":
        return True  # host memory: the copy is the size of the adapted weights, as a checkpoint save is
    need = sum(w.numel() * w.element_size() for w in weights)
    free = free_gpu_bytes(device)
    if need + _HEADROOM_BYTES + free // 10 <= free:
        return True
    log.info(
        "prediction runs with LoRA unmerged: merging needs %.1f GiB and %.1f GiB is free",
        need / 2**30,
        free / 2**30,
    )
    return False


@contextmanager
def merged_lora(model: torch.nn.Module, enabled: bool = True, samples: int | None = None) -> Iterator[int]:
    """Inside, the model's LoRA layers run as single merged matmuls; yields how many were merged (0 when
    nothing could be, `enabled` is False, or the call predicts fewer than MIN_SAMPLES `samples`).
    Afterwards every base weight is the original tensor and the adapters run as before."""
    enabled = enabled and (samples is None or samples >= MIN_SAMPLES)
    layers = mergeable_layers(model) if enabled else []
    if not layers or not _fits(layers):
        yield 0
        return
    swapped: list[tuple[torch.nn.Linear, torch.nn.Parameter, LoraLinear]] = []
    try:
        with torch.no_grad():
            for module in layers:
                base, adapter = module.get_base_layer(), module.active_adapters[0]
                weight = base.weight
                # W + s * B @ A in one GEMM, summed in fp32 and rounded once. A and B in the weight's
                # dtype, as the bf16 training forward cast them under autocast.
                lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                merged = torch.addmm(
                    weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=module.scaling[adapter]
                )
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
                # peft's own switch: a disabled layer runs base_layer(x) only (its `merged` flag stays
                # False, so peft never tries to unmerge the swapped-in weight).
                module._disable_adapters = True
                swapped.append((base, weight, module))
        yield len(swapped)
    finally:
        for base, weight, module in swapped:
            base.weight = weight
            module._disable_adapters = False
