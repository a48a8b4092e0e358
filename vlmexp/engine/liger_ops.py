"""SwiGLU and RoPE as liger-kernel's fused Triton kernels (speed.liger: CUDA, liger-kernel installed).

After the fused RMSNorm (`fused_norm.py`) and LoRA's fused add (`lora_fused.py`), the decoder layer's
elementwise work left in an eager step is mostly the MLP's `silu(gate) * up` (two kernels over the
(tokens x 11008) intermediate of the 3B, forward and backward) and RoPE's `q * cos + rotate_half(q) *
sin` (five passes over q and k). On 4 decoder layers of the Qwen2.5-VL-3B shape (batch 24 x 576 tokens,
LoRA all-linear, H200; scripts/layer_probe.py, run P1 in docs/performance.md) liger's SwiGLU and RoPE
took a training step from 69.6 to 63.2 ms. torch has no fused op for either, and compiling the layers
costs more than a run saves (runs S and AA).

Without gradients, the norms `fused_norm` fused also take liger's RMSNorm, whose kernel multiplies by
the weight too (see `fused_norm`: a second pass over the activations otherwise).

Same values up to bf16 rounding: liger computes silu(gate) * up in fp32 and rounds once (the plain
forward rounds silu's output first), and RoPE in the inputs' dtype as the plain function does.

Which modules: an MLP whose `act_fn` is SiLU and whose class's forward gives `down(silu(gate(x)) *
up(x))`, and an attention whose forward calls its module's `apply_rotary_pos_emb` where that function
gives the half-rotation formula; both checked once per class/function on the CPU, as `fused_norm`
checks norms. Gemma's GELU MLPs, interleaved or otherwise different RoPE functions and anything else
keep their own code (on the tiny families: Qwen2/2.5/3-VL, SmolVLM, LLaVA and Qwen3.5 get both, Gemma 3
the RoPE only, Qwen3-VL-MoE's experts and Gemma 4 neither). Patched per instance: other models in the
process are untouched. The attention's wrapper swaps its module's `apply_rotary_pos_emb` for the liger
one during the call only (the forward looks the name up in its module), so a reference model of the
same family in the process keeps the plain function.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlmexp.engine.fused_norm import INFER_KERNEL, is_fused
from vlmexp.models.parts import unwrap

log = logging.getLogger(__name__)

ROPE_NAME = "apply_rotary_pos_emb"
_MLP_OK: dict[type, bool] = {}
_ROPE_OK: dict[int, bool] = {}  # id(function) -> whether it is the half-rotation formula


def kernels() -> tuple[Callable, Callable, Callable] | None:
    """(silu_mul(a, b), rope(q, k, cos, sin), rms_norm(x, weight, eps)) from liger-kernel, or None when it
    is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # "llama" casting: the rms in fp32, the normalised row cast to x's dtype, then times the weight
        # (exact in fp32 for bf16 operands, rounded once): the plain Llama/Qwen forward's arithmetic.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    return LigerSiLUMulFunction.apply, liger_rotary_pos_emb, rms_norm


def _reference_rope(q, k, cos, sin, unsqueeze_dim=1):
    """The half-rotation RoPE over the first cos.shape[-1] dims of each head (all of them, or a
    partial rotary width such as Qwen3.5's), the rest passed through; liger infers the width the same way."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate(x):
        x, rest = x[..., :rd], x[..., rd:]
        half = rd // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return torch.cat((x * cos + turned * sin, rest), dim=-1)

    return rotate(q), rotate(k)


def _mlp_candidate(module: torch.nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj")
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, n) for n in names)
        and "forward" not in module.__dict__
        and isinstance(act, torch.nn.Module)
        and _is_silu(act)
    )


def _is_silu(act) -> bool:
    x = torch.linspace(-4, 4, 9)
    try:
        return torch.allclose(act(x), F.silu(x))
    except (TypeError, RuntimeError):
        return False


def _mlp_same(module: torch.nn.Module) -> bool:
    """Whether the MLP's class computes down(silu(gate(x)) * up(x)): its forward on a small random
    copy of its shapes on the CPU against that formula (fp32, close). Cached per class."""
    cls = type(module)
    if cls not in _MLP_OK:
        gen = torch.Generator().manual_seed(0)
        # The formula does not depend on the sizes: small linears (8 -> 16) stand in for the real ones
        # (2048 -> 11008 on the 3B, 270 MB of random weights for nothing).
        hidden, inner = 8, 16
        ok = _in_features(module.gate_proj) is not None and _out_features(module.gate_proj) is not None
        if ok:
            gate, up = torch.nn.Linear(hidden, inner, bias=False), torch.nn.Linear(hidden, inner, bias=False)
            down = torch.nn.Linear(inner, hidden, bias=False)
            for lin in (gate, up, down):
                lin.weight.data = torch.randn(lin.weight.shape, generator=gen) / lin.weight.shape[1] ** 0.5
            probe = copy_shell(module, gate_proj=gate, up_proj=up, down_proj=down)
            x = torch.randn(2, 3, hidden, generator=gen)
            try:
                with torch.no_grad():
                    plain = cls.forward(probe, x)
                    want = down(F.silu(gate(x)) * up(x))
                ok = plain.shape == want.shape and torch.allclose(plain, want, rtol=1e-5, atol=1e-5)
            except (TypeError, RuntimeError, AttributeError):
                ok = False
        _MLP_OK[cls] = ok
    return _MLP_OK[cls]


def copy_shell(module: torch.nn.Module, **children: torch.nn.Module) -> torch.nn.Module:
    """An object of `module`'s class with its plain attributes and the given child modules, built
    without running its __init__ (which wants the model's config)."""
    shell = module.__class__.__new__(module.__class__)
    torch.nn.Module.__init__(shell)
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key not in children and key != "training":
            shell.__dict__[key] = value
    shell.act_fn = torch.nn.SiLU()
    for name, child in children.items():
        setattr(shell, name, child)
    return shell


def _in_features(linear) -> int | None:
    base = getattr(linear, "base_layer", linear)  # a peft LoRA layer wraps the linear
    return getattr(base, "in_features", None)


def _out_features(linear) -> int | None:
    base = getattr(linear, "base_layer", linear)
    return getattr(base, "out_features", None)


def _rope_same(fn) -> bool:
    """Whether `fn(q, k, cos, sin)` is the half-rotation RoPE (Llama's; Qwen2.5-VL's text RoPE after its
    M-RoPE sections are recomposed into cos/sin): equal to `_reference_rope` on small random tensors in
    fp32 with cos/sin as wide as a head, and, where it takes them, half as wide (partial rotary)."""
    if id(fn) not in _ROPE_OK:
        gen = torch.Generator().manual_seed(0)
        q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
        ok = True
        for width in (8, 4):
            cos, sin = torch.randn(2, 5, width, generator=gen), torch.randn(2, 5, width, generator=gen)
            try:
                got = fn(q.clone(), k.clone(), cos, sin)
            except (TypeError, RuntimeError, ValueError):
                ok = ok and width != 8  # a function without partial rotary never meets narrow cos/sin
                continue
            want = _reference_rope(q, k, cos, sin)
            ok = ok and all(
                g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-5)
                for g, w in zip(got, want, strict=True)
            )
        _ROPE_OK[id(fn)] = ok
    return _ROPE_OK[id(fn)]


def _reference_vision_rope(q, k, cos, sin):
    """Qwen-VL's `apply_rotary_pos_emb_vision`: (S, heads, d) q and k, (S, d) cos and sin, the
    half-rotation computed in fp32 and cast back to the inputs' dtype."""
    q4, k4 = _reference_rope(
        q.float()[None].transpose(1, 2), k.float()[None].transpose(1, 2), cos[None], sin[None]
    )
    return q4.transpose(1, 2)[0].to(q.dtype), k4.transpose(1, 2)[0].to(k.dtype)


def _vision_rope(q, k, cos, sin, *, rope: Callable):
    """`_reference_vision_rope` through the batch-major kernel, q and k as (1, heads, S, d) views.
    liger computes in cos's dtype and stores in q's: fp32 cos and sin (as the tower passes them) keep
    the plain function's fp32 arithmetic. On the 3B's tower the plain one is ~10 elementwise passes
    over fp32 copies of q and k per block: about 40% of the eager tower's kernel time (run AL)."""
    q4, k4 = rope(q[None].transpose(1, 2), k[None].transpose(1, 2), cos[None].float(), sin[None].float())
    return q4.transpose(1, 2)[0].to(q.dtype), k4.transpose(1, 2)[0].to(k.dtype)


def _vision_rope_same(fn) -> bool:
    """Whether `fn(q, k, cos, sin)` is `_reference_vision_rope` (random fp32 tensors, close). Cached."""
    if id(fn) not in _ROPE_OK:
        gen = torch.Generator().manual_seed(0)
        q, k = torch.randn(5, 4, 8, generator=gen), torch.randn(5, 4, 8, generator=gen)
        cos, sin = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
        try:
            got = fn(q.clone(), k.clone(), cos, sin)
            want = _reference_vision_rope(q, k, cos, sin)
            ok = all(
                g.shape == w.shape and torch.allclose(g, w, rtol=1e-5, atol=1e-5)
                for g, w in zip(got, want, strict=True)
            )
        except (TypeError, RuntimeError, ValueError):
            ok = False
        _ROPE_OK[id(fn)] = ok
    return _ROPE_OK[id(fn)]


def _fused_mlp(self, x: torch.Tensor, *, silu_mul: Callable) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _rope_attention(self, *args, _plain: Callable, _module, _rope: Callable, _default: Callable, **kwargs):
    # The forward looks `apply_rotary_pos_emb` up in its module at call time: swapped for this call only.
    setattr(_module, ROPE_NAME, _rope)
    try:
        return _plain(*args, **kwargs)
    finally:
        setattr(_module, ROPE_NAME, _default)


def _rope_module(module: torch.nn.Module):
    """The modeling module whose `apply_rotary_pos_emb` this attention's forward calls, or None."""
    forward = inspect.unwrap(type(module).forward)  # past decorators, e.g. transformers' deprecate_kwarg
    code = getattr(forward, "__code__", None)
    if "forward" in module.__dict__ or code is None or ROPE_NAME not in code.co_names:
        return None
    home = sys.modules.get(forward.__module__)
    fn = getattr(home, ROPE_NAME, None)
    return home if fn is not None and _rope_same(fn) else None


def fuse(model: torch.nn.Module, ops: tuple[Callable, ...] | None = None) -> dict:
    """Give `model`'s SiLU MLPs and half-rotation RoPE attentions liger's kernels, and its fused norms
    (`fused_norm.fuse_norms`, applied before) liger's RMSNorm for gradient-free calls; {"swiglu": n,
    "rope": n, "vision_rope": n, "norm_infer": n} (vision_rope: Qwen-VL vision attentions batched by
    `vision_speed`, whose RoPE is the same rotation on (S, heads, d) tensors). `ops`: (silu_mul, rope[,
    rms_norm]) to use instead of liger's (tests use plain torch ones)."""
    ops = ops or kernels()
    if ops is None:
        log.info("speed.liger: liger-kernel is not installed (pip install liger-kernel); left off")
        return {}
    silu_mul, rope, *rest = ops
    norm = rest[0] if rest else None
    counts = {"swiglu": 0, "rope": 0, "vision_rope": 0, "norm_infer": 0}
    for module in unwrap(model).modules():
        if norm is not None and is_fused(module) and INFER_KERNEL not in module.__dict__:
            module.__dict__[INFER_KERNEL] = norm
            counts["norm_infer"] += 1
            continue
        if _mlp_candidate(module) and _mlp_same(module):
            module.forward = types.MethodType(functools.partial(_fused_mlp, silu_mul=silu_mul), module)
            counts["swiglu"] += 1
            continue
        # A vision attention of `vision_speed.patch_vision_attention` calls its `_vlmexp_rope`
        vision = module.__dict__.get("_vlmexp_rope")
        if (
            vision is not None
            and getattr(vision, "func", None) is not _vision_rope
            and _vision_rope_same(vision)
        ):
            module._vlmexp_rope = functools.partial(_vision_rope, rope=rope)
            counts["vision_rope"] += 1
            continue
        home = _rope_module(module)
        if home is not None:
            plain = module.forward
            default = getattr(home, ROPE_NAME)
            module.forward = functools.partial(
                _rope_attention, module, _plain=plain, _module=home, _rope=rope, _default=default
            )
            counts["rope"] += 1
    return counts
