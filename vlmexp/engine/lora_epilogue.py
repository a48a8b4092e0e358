"""LoRA's scale and add inside lora_B's matmul (speed.lora_addmm): one kernel where peft runs three.

peft's LoRA Linear computes `result + lora_B(lora_A(dropout(x))) * scaling`: lora_B's matmul writes
its (tokens x out) output, a second kernel multiplies it by the scaling, a third adds it to the base
layer's output, each a full pass over e.g. 13,824 x 11,008 values for a 3B gate_proj at batch 24, and
the backward multiplies the full-size gradient by the scaling once more. `torch.addmm(result, h,
lora_B.weight.T, alpha=scaling)` does the same sum in the matmul's epilogue (cuBLAS: beta * C + alpha *
A @ B), and its backward scales only the small (tokens x r) gradient. On 4 decoder layers of the
3B shape these multiplies and adds were ~10% of an eager training step's kernel time (H200,
scripts/layer_probe.py's profile; docs/performance.md).

Same sum, one rounding: under bf16 autocast peft rounds lora_B's output, the scaled output and the
sum to bf16 in turn; the epilogue adds in fp32 and rounds once, so values agree within a bf16 rounding
of the base output. Taken only in the plain case under autocast (training steps, predictions): one
active vanilla adapter, not merged or disabled, no lora_B bias, no extra arguments. Everything else
(fp32 runs, DoRA, mixed adapter batches) runs peft's own forward. Patched per instance, so other
models in the process keep peft's forward. `engine/speed.py` applies it on CUDA to each new adapter.
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from vlmexp.models.parts import unwrap


def _plain(layer: LoraLinear) -> str | None:
    """The one active vanilla adapter's name when the epilogue computes what peft would, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_B[name].bias is not None:
        return None
    return name


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs or not torch.is_autocast_enabled(x.device.type) else _plain(self)
    if name is None:
        return LoraLinear.forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    # _cast_input_dtype honours peft's disable_input_dtype_casting (speed.lora_bf16_inputs)
    h = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        h.reshape(-1, h.shape[-1]),
        lora_B.weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape).to(result.dtype)


def fuse_lora_epilogue(model: torch.nn.Module) -> int:
    """Give each of `model`'s peft LoRA Linear layers not yet patched the epilogue forward; the count.
    Quantised layers (bitsandbytes' LoRA classes) are other classes and keep peft's forward."""
    n = 0
    for module in unwrap(model).modules():
        if type(module) is LoraLinear and "forward" not in module.__dict__:
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n
