"""speed.fused_norm (engine/fused_norm.py): the Llama-style RMSNorms take torch's fused kernel, and the
model computes what it computed before: same logits and gradients, bit for bit on the CPU in bf16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlmexp.engine.fused_norm import fuse_norms
from vlmexp.models.tiny import FAMILIES

# the tiny families whose norms compute weight * (x / rms(x)) with the cast before the weight's mul
FUSED = {"qwen2_vl", "qwen2_5_vl", "smolvlm", "llava", "qwen3_vl", "qwen3_vl_moe"}


class OnePlusRMSNorm(torch.nn.Module):
    """Gemma-style: scales by (1 + weight); same attributes as a Llama norm, another output."""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class LlamaStyleRMSNorm(OnePlusRMSNorm):
    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * normed.to(x.dtype)


def _inputs(model, tokens: int = 12) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (2, tokens), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _run(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_style_norms_are_fused_and_the_model_computes_the_same(tiny_models, family):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family), dtype=torch.bfloat16)
    inputs = _inputs(model)
    plain_logits, plain_grads = _run(model, inputs)
    n = fuse_norms(model)
    if family not in FUSED:  # Gemma's (1 + weight) or fp32-weight norms, Qwen3.5's: left alone
        assert n == 0
        return
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__ and "forward" in m.__dict__]
    assert n == len(norms) >= 3  # at least a decoder layer's two norms and the final one
    fused_logits, fused_grads = _run(model, inputs)
    assert torch.equal(fused_logits, plain_logits)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=0, msg=name)
    assert fuse_norms(model) == 0  # patched norms are not patched again


def test_a_norm_with_another_formula_keeps_its_forward():
    one_plus, llama = OnePlusRMSNorm(16), LlamaStyleRMSNorm(16)
    model = torch.nn.Sequential(one_plus, llama)
    assert fuse_norms(model) == 1
    assert "forward" not in one_plus.__dict__ and "forward" in llama.__dict__
    x = torch.randn(3, 16)
    torch.testing.assert_close(llama(x), LlamaStyleRMSNorm.forward(llama, x))


@pytest.mark.gpu
def test_on_cuda_under_autocast_the_fused_norm_keeps_dtype_and_values():
    """The fused CUDA kernel (one reduction order) against the plain forward, bf16 under autocast as in
    training: bf16 out (autocast does not turn it fp32) and equal within one bf16 rounding."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    torch.manual_seed(0)
    norm = Qwen2_5_VLRMSNorm(2048).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = (torch.randn(4, 576, 2048, device="cuda") * 3).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cuda", torch.bfloat16):
        plain = norm(x)
        (gx_plain,) = torch.autograd.grad(plain.float().square().sum(), x)
        assert fuse_norms(norm) == 1
        fused = norm(x)
        (gx_fused,) = torch.autograd.grad(fused.float().square().sum(), x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused, plain, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gx_fused, gx_plain, rtol=5e-2, atol=5e-2)
