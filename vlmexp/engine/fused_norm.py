"""RMSNorm as one fused kernel (speed.fused_norm): the same output, a fraction of the kernels.

transformers' Llama-style RMSNorm (Qwen2/2.5/3-VL, Llama in SmolVLM and LLaVA) runs 8 kernels a call:
a cast to fp32, pow, mean, add, rsqrt, mul, a cast back, the weight's mul, each a full pass over the
activations, twice per decoder layer and again in the backward. torch's `F.rms_norm` computes the same
thing (fp32 inside, the input's dtype out) in one fused kernel on CUDA, forward and backward. On 4
decoder layers of the Qwen2.5-VL-3B shape (batch 24 x 576 tokens, LoRA all-linear, H200) a training
step went 75.0 -> 68.7 ms and a no-grad forward 31.8 -> 30.4 ms (scripts/layer_probe.py); a whole
3B demo run 157.1 -> 139.1 s in one call, the same CV (run Z, docs/performance.md).

Which norms: those whose forward gives what the fused one gives, checked once per class on a small
random input and a random weight (`_same_as_fused`), not a list of class names. A norm that scales by
(1 + weight) (Gemma 3), multiplies the weight before its cast (Gemma 4) or takes a gate (Qwen3.5's
gated norm) fails the check and keeps its own forward.
Patched per instance, so other models in the process are untouched. `engine/speed.py` applies it on
CUDA, once per base model.

Without gradients (prediction, validation, the vision pre-pass) a norm that `liger_ops.fuse` gave an
inference kernel (`INFER_KERNEL`: liger's RMSNorm, Llama casting) runs that instead: the weight's
multiply happens inside the same kernel. torch's fused op has no weight argument with this rounding (it
would multiply in fp32 and round once), so the multiply was a second pass over the activations: 292
launches, 16.2 of 439 ms of kernel time for 64 cached images on the 3B (run AL's profile). Training keeps
torch's kernel, whose backward computes no gradient for the frozen weight (liger's always does).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from vlmexp.models.parts import unwrap

_CHECKED: dict[type, bool] = {}  # norm class -> whether its forward equals the fused one
INFER_KERNEL = "_vlmexp_norm_infer"  # instance attribute: kernel(x, weight, eps) for gradient-free calls


def _eps(module: torch.nn.Module) -> float | None:
    # Llama/Qwen store it as `variance_epsilon` (1e-6), others as `eps`. Plain attributes live in the
    # module's __dict__: read there, as every fused forward does, without nn.Module.__getattr__ raising
    # (and getattr catching) an AttributeError for the name a class lacks.
    attrs = module.__dict__
    eps = attrs.get("variance_epsilon", attrs.get("eps"))
    return eps if isinstance(eps, float) else None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    infer = self.__dict__.get(INFER_KERNEL)
    # Same dtype only: a fp32 weight times a bf16 input gives fp32 in the plain forward, bf16 in the kernel.
    if infer is not None and not torch.is_grad_enabled() and hidden_states.dtype == self.weight.dtype:
        return infer(hidden_states, self.weight, _eps(self))
    # Autocast off inside: it may run norms in fp32 (as it does layer_norm), which would hand the next
    # matmul an fp32 input; the plain forward returns the input's dtype (bf16) times the weight.
    with torch.autocast(hidden_states.device.type, enabled=False):
        normed = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=_eps(self))
    return self.weight * normed


def _candidate(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "RMSNorm" in type(module).__name__
        and "forward" not in module.__dict__  # not patched already, here or elsewhere
        and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 1
        and weight.dtype.is_floating_point
        and _eps(module) is not None
    )


def _same_as_fused(module: torch.nn.Module) -> bool:
    """Whether `module`'s class computes weight * rms_norm(x) with the plain forward's casts: its own
    forward against the fused formula on a (2, 5, hidden) input with a random weight, on the CPU, close
    in fp32 and bit-equal in bf16 (a norm that multiplies the weight in fp32 and casts once, as Gemma 4's
    does, differs there by a rounding). Cached per class."""
    cls = type(module)
    if cls not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        hidden = module.weight.shape[0]
        x, weight = torch.randn(2, 5, hidden, generator=gen) * 3, torch.randn(hidden, generator=gen)
        same = True
        for dtype in (torch.float32, torch.bfloat16):
            xd, wd = x.to(dtype), weight.to(dtype)
            try:
                with torch.no_grad():
                    plain = torch.func.functional_call(module, {"weight": wd}, (xd,))
            except (TypeError, RuntimeError):  # Qwen3.5's forward(x, gate); a buffer on the GPU
                same = False
                break
            fused = wd * F.rms_norm(xd, (hidden,), eps=_eps(module))
            if dtype == torch.float32:
                same &= plain.shape == fused.shape and torch.allclose(plain, fused, rtol=1e-5, atol=1e-5)
            else:
                same &= plain.dtype == fused.dtype and torch.equal(plain, fused)
        _CHECKED[cls] = bool(same)
    return _CHECKED[cls]


def is_fused(module: torch.nn.Module) -> bool:
    """Whether `fuse_norms` gave `module` the fused forward."""
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_forward


def fuse_norms(model: torch.nn.Module) -> int:
    """Give every RMSNorm of `model` that passes `_same_as_fused` the fused forward; the count."""
    n = 0
    for module in unwrap(model).modules():
        if not _candidate(module) or not _same_as_fused(module):
            continue
        module.forward = types.MethodType(_fused_forward, module)
        n += 1
    return n
