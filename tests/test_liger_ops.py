"""speed.liger (engine/liger_ops.py): SiLU MLPs and half-rotation RoPE attentions take the fused kernels,
and the model computes what it computed before. On the CPU the kernels are stand-ins with the plain
math (liger's Triton kernels need CUDA), so what is tested here is which modules are patched, that the
patched forwards call the kernels, and that nothing else changes; the gpu test runs liger itself."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from vlmexp.engine import liger_ops
from vlmexp.engine.fused_norm import fuse_norms
from vlmexp.models.tiny import FAMILIES

# SiLU-gated MLPs in the decoder (and Qwen2.5-VL's vision blocks); Gemma's are GELU
SWIGLU = {"qwen2_vl", "qwen2_5_vl", "smolvlm", "llava", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"}


class Counting:
    """The plain math as the 'kernels', counting their calls."""

    def __init__(self):
        self.silu_mul_calls = self.rope_calls = 0

    def silu_mul(self, a, b):
        self.silu_mul_calls += 1
        return F.silu(a) * b

    def rope(self, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        self.rope_calls += 1
        return liger_ops._reference_rope(q, k, cos, sin, unsqueeze_dim)


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_modules_call_the_kernels_and_the_model_computes_the_same(tiny_models, family):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family), dtype=torch.float32)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    plain_logits, plain_grads = _run(model, ids)
    ops = Counting()
    counts = liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope))
    layers = model.config.get_text_config().num_hidden_layers
    if family in SWIGLU:
        assert counts["swiglu"] >= layers - sum(1 for m in model.modules() if "Moe" in type(m).__name__)
    else:
        assert counts["swiglu"] == 0
    logits, grads = _run(model, ids)
    # text-only inputs: every patched MLP outside the vision tower ran once, through the kernel
    text_mlps = [n for n, m in model.named_modules() if "forward" in m.__dict__ and hasattr(m, "gate_proj")]
    assert ops.silu_mul_calls == len([n for n in text_mlps if "visual" not in n and "vision" not in n])
    assert ops.rope_calls == counts["rope"]  # each patched attention ran once, through the kernel
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not any(liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope)).values())  # once only


def test_qwen2_5_vl_decoder_gets_both_and_the_module_function_is_put_back(tiny_models):
    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl"), dtype=torch.float32)
    home = sys.modules[type(model.model.language_model.layers[0].self_attn).__module__]
    plain_fn = home.apply_rotary_pos_emb
    ops = Counting()
    counts = liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope))
    layers = model.config.get_text_config().num_hidden_layers
    assert counts["rope"] == layers
    assert counts["swiglu"] == layers + model.config.vision_config.depth  # vision blocks are SiLU-gated too
    model(input_ids=torch.tensor([[5, 6, 7]]))
    assert ops.rope_calls == layers
    assert home.apply_rotary_pos_emb is plain_fn  # swapped for the call only


def test_a_gelu_mlp_and_another_rope_keep_their_code():
    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
            self.down_proj, self.act_fn = torch.nn.Linear(8, 4), torch.nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class SwappedMLP(GeluMLP):  # SiLU, but on the up projection: another formula
        def __init__(self):
            super().__init__()
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))

    model = torch.nn.Sequential(GeluMLP(), SwappedMLP())
    none = {"swiglu": 0, "rope": 0, "vision_rope": 0, "norm_infer": 0}
    assert liger_ops.fuse(model, ops=(None, None)) == none
    assert not any("forward" in m.__dict__ for m in model)

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # pairs (2i, 2i+1), not halves
        def rot(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    assert not liger_ops._rope_same(interleaved)
    assert liger_ops._rope_same(liger_ops._reference_rope)


def test_fused_norms_take_the_inference_kernel_only_without_gradients(tiny_models):
    """Prediction's norms run the kernel with the weight's multiply inside; training's keep torch's
    fused op (its backward computes no gradient for the frozen weight). A norm fuse_norms left alone
    (another formula) gets no kernel."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl"), dtype=torch.float32)
    norms = [m for m in model.modules() if type(m).__name__ == "Qwen2_5_VLRMSNorm"]
    ops, calls = Counting(), []

    def norm_kernel(x, weight, eps):  # the plain Llama arithmetic, counting its calls
        calls.append(x.shape)
        return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    assert liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope, norm_kernel))["norm_infer"] == 0  # none fused
    fuse_norms(model)
    assert liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope, norm_kernel))["norm_infer"] == len(norms)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        inferred = model(input_ids=ids).logits
    text_norms = 2 * model.config.get_text_config().num_hidden_layers + 1  # two a layer and the final one
    assert len(calls) == text_norms
    calls.clear()
    trained = model(input_ids=ids).logits
    assert calls == [] and trained.requires_grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an input in another dtype than the weight: the plain path's fp32 output
        out = norms[0](torch.ones(1, norms[0].weight.shape[0], dtype=torch.bfloat16))
    assert calls == [] and out.dtype == torch.float32


def _tower_features(model, seed: int = 2):
    """The vision tower's merged features of two random images of two patch grids, 4x4 and 4x6."""
    vc = model.config.vision_config
    grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=gen).to(model.device, model.dtype)
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid.to(model.device), return_dict=True)
    return torch.cat(out.pooler_output)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_batched_vision_attention_takes_the_rope_kernel_and_computes_the_same(tiny_models, family):
    """Qwen-VL vision attentions batched by `vision_speed` call their RoPE through the kernel (as
    (1, heads, S, d) views): one call a block per forward, the same features."""
    from vlmexp.engine import vision_speed

    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family), dtype=torch.float32)
    depth = model.config.vision_config.depth
    assert vision_speed.patch_vision_attention(model) == depth
    plain = _tower_features(model)
    ops = Counting()
    assert liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope))["vision_rope"] == depth
    got = _tower_features(model)
    assert ops.rope_calls == depth  # the text attentions did not run: every call was a vision block's
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert liger_ops.fuse(model, ops=(ops.silu_mul, ops.rope))["vision_rope"] == 0  # once only
    assert not liger_ops._vision_rope_same(lambda q, k, cos, sin: (q * cos[:, None], k * cos[:, None]))


@pytest.mark.gpu
def test_liger_vision_rope_on_cuda_matches_the_plain_tower_in_bf16(tiny_models):
    if liger_ops.kernels() is None:
        pytest.skip("liger-kernel is not installed")
    from vlmexp.engine import vision_speed

    model = AutoModelForImageTextToText.from_pretrained(
        tiny_models("qwen2_5_vl"), dtype=torch.bfloat16
    ).cuda()
    vision_speed.patch_vision_attention(model)
    plain = _tower_features(model)
    assert liger_ops.fuse(model)["vision_rope"] == model.config.vision_config.depth
    torch.testing.assert_close(_tower_features(model).float(), plain.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_liger_kernels_on_cuda_match_the_plain_model_in_bf16(tiny_models):
    if liger_ops.kernels() is None:
        pytest.skip("liger-kernel is not installed")
    torch.manual_seed(0)
    path = tiny_models("qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 100, (2, 40), device="cuda")
    plain_logits, plain_grads = _run(model, ids)
    counts = liger_ops.fuse(model)
    assert counts["swiglu"] > 0 and counts["rope"] > 0
    logits, grads = _run(model, ids)
    torch.testing.assert_close(logits.float(), plain_logits.float(), rtol=5e-2, atol=5e-2)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name].float(), grad.float(), rtol=1e-1, atol=5e-2, msg=name)


@pytest.mark.gpu
def test_liger_norm_for_inference_on_cuda_matches_the_plain_norm_in_bf16():
    """liger's RMSNorm with the weight inside, against transformers' plain forward on the 3B's width:
    the same arithmetic but for the rms's reduction order, so at most one bf16 rounding apart."""
    if liger_ops.kernels() is None:
        pytest.skip("liger-kernel is not installed")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    torch.manual_seed(0)
    norm = Qwen2_5_VLRMSNorm(2048).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(8, 570, 2048, device="cuda") * 3).to(torch.bfloat16)
    with torch.no_grad():
        plain = norm(x)
        assert fuse_norms(norm) == 1 and liger_ops.fuse(norm)["norm_infer"] == 1
        fused = norm(x)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=1.6e-2, atol=1e-2)
    assert (fused == plain).float().mean() > 0.99
