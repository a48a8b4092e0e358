"""LoRA's up-projection, scaling and add as one GEMM in training steps: `addmm(base_out, h, B.T, alpha=s)`.

peft computes an adapted layer as `result + lora_B(lora_A(dropout(x))) * scaling`: after lora_B's thin
matmul, two elementwise kernels each read and write the layer's whole output (for a 3B's gate/up
projections, 24 rows x 640 tokens x 11008 values), and the backward multiplies the incoming gradient by
the scaling over that whole output again. cuBLAS does both in the GEMM's epilogue instead:
`torch.addmm(result, h, B.T, alpha=scaling)` = result + scaling * (h @ B.T), with the add and the scaling
fused; its backward scales only the thin (tokens x r) and (r x out) gradients. In the 3B's profiled step
(run AB, docs/performance.md) elementwise mul and add were 22% of the kernel time.

Same values up to rounding: the sum is now rounded to bf16 once instead of three times
(tests/test_lora_fused.py: CPU fp32 loss and gradients equal to 1e-5 on the tiny families). Anything
but plain LoRA with one active adapter on a layer whose output already has the adapter's compute
dtype (DoRA and other variants, mixed-adapter batches, merged or disabled adapters, a bias on lora_B,
fp32 LoRA weights on a bf16 base without autocast) runs peft's own forward.

Used as a context manager around the trainer's step (`speed.lora_fused`): the class's forward is
swapped for the step's forward and backward, so no module keeps a patched method between folds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

_peft_forward = LoraLinear.forward


def _fused_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or self.disable_adapters or self.merged:
        return _peft_forward(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or active[0] in self.lora_variant:
        return _peft_forward(self, x)
    name = active[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None:
        return _peft_forward(self, x)
    self._check_forward_args(x)
    result = self.base_layer(x)
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    # addmm takes one dtype; under autocast it casts all three to the autocast dtype, as F.linear does
    if not torch.is_autocast_enabled(x.device.type) and not (result.dtype == h.dtype == lora_b.weight.dtype):
        return _peft_forward(self, x)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        h.reshape(-1, h.shape[-1]),
        lora_b.weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape).to(result.dtype)


@contextmanager
def fused_lora(active: bool = True) -> Iterator[None]:
    """Inside (when `active`), peft's LoRA linear layers run the fused forward above."""
    if not active:
        yield
        return
    LoraLinear.forward = _fused_forward
    try:
        yield
    finally:
        LoraLinear.forward = _peft_forward
