"""engine/packed_gqa.py: grouped-query attention under a mask with the query heads stacked per kv head
equals transformers' SDPA path (keys and values repeated), and the candidates' pass uses it."""

from __future__ import annotations

import types
from contextlib import nullcontext

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlmexp.engine import packed_gqa, scoring
from vlmexp.engine.packed_gqa import packed_sdpa


def _inputs(device="cpu", dtype=torch.float32, heads=8, groups=2, length=5, cache=11, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=gen)
    k, v = (torch.randn(2, groups, cache + length, dim, generator=gen) for _ in range(2))
    mask = torch.rand(2, 1, length, cache + length, generator=gen) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    module = types.SimpleNamespace(num_key_value_groups=heads // groups, is_causal=True, training=False)
    return module, *(t.to(device, dtype) for t in (q, k, v)), mask.to(device)


def test_packed_attention_equals_transformers_repeated_keys():
    module, q, k, v, mask = _inputs()
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    got = packed_sdpa(q, k, v, mask, scaling=0.25)
    assert got.shape == want.shape == (2, 5, 8, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # a query head of another kv head would see other keys: the grouping is repeat_kv's (h // 4)
    swapped = packed_sdpa(q.flip(1), k, v, mask, scaling=0.25).flip(2)
    assert not torch.allclose(swapped, want, atol=1e-3)


def test_the_repeated_mask_is_made_once_as_an_aligned_additive_bias():
    """SDPA converts a boolean mask to an additive one, and the memory-efficient kernel copies a bias whose
    rows are not 16-aligned, at every call: made once per forward here, the layers reuse it as it is."""
    module, q, k, v, mask = _inputs(length=5, cache=11)  # 16 keys: aligned already; 13 is not
    mask = mask[..., :13]
    k, v = k[:, :, :13], v[:, :, :13]
    memo: dict = {}
    first = packed_sdpa(q, k, v, mask, scaling=0.25, memo=memo)
    (held,) = memo.values()
    bias = held[1]
    assert bias.dtype == q.dtype and bias.shape == (2, 1, 4 * 5, 13)
    assert bias.stride(-2) % 16 == 0  # rows padded to 16 elements in storage
    assert (
        torch.equal(bias == 0, mask.repeat(1, 1, 4, 1))
        and bias[~mask.repeat(1, 1, 4, 1)].eq(-torch.inf).all()
    )
    again = packed_sdpa(q, k, v, mask, scaling=0.25, memo=memo)
    assert len(memo) == 1 and torch.equal(first, again)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(first, want, rtol=1e-6, atol=1e-6)


def test_the_output_comes_back_in_one_copy():
    """(B, Hkv, n_rep * T, D) -> (B, T, Hq, D) is one permuted copy, not a reshape then a transposed copy."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (
                torch.ops.aten.clone.default,
                torch.ops.aten.copy_.default,
                torch.ops.aten._unsafe_view.default,
            ):
                Copies.n += func is not torch.ops.aten._unsafe_view.default
            return func(*args, **(kwargs or {}))

    module, q, k, v, mask = _inputs()
    q = (
        q.transpose(1, 2).contiguous().transpose(1, 2)
    )  # as the attention module hands it: (B, T, H, D) in memory
    memo = {
        (mask.data_ptr(), tuple(mask.shape), mask.dtype, 4, q.dtype): (
            mask,
            packed_gqa.additive_bias(mask.repeat(1, 1, 4, 1), q.dtype),
        )
    }
    with Copies():
        out = packed_sdpa(q, k, v, mask, scaling=0.25, memo=memo)
    assert out.is_contiguous() and out.shape == (2, 5, 8, 16)
    assert Copies.n <= 2  # the query's stacking and the output's, each once
    torch.testing.assert_close(
        out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0], rtol=1e-6, atol=1e-6
    )


def test_the_swap_is_undone_and_calls_it_does_not_fit_go_to_transformers():
    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    module, q, k, v, mask = _inputs()
    with pytest.raises(RuntimeError, match="inside"), packed_gqa.packed_gqa():
        fn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
        assert fn is not plain
        packed, _ = fn(module, q, k, v, mask, scaling=0.25)
        torch.testing.assert_close(packed, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])
        causal, _ = fn(module, q, k, v, None, scaling=0.25)  # no mask: transformers' own path
        torch.testing.assert_close(causal, sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0])
        raise RuntimeError("inside")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is plain
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_nested_contexts_and_other_threads(monkeypatch):
    """Another thread's forward while one thread is inside goes to transformers' function; the entry is
    put back only when the outermost context ends."""
    import threading

    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []
    real = packed_gqa.packed_sdpa
    monkeypatch.setattr(packed_gqa, "packed_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    module, q, k, v, mask = _inputs()
    seen = {}

    def other_thread():
        seen["out"] = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)(module, q, k, v, mask, scaling=0.25)

    with packed_gqa.packed_gqa():
        with packed_gqa.packed_gqa():
            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
            assert calls == []  # the other thread did not pack
            ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)(module, q, k, v, mask, scaling=0.25)
            assert calls == [1]
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not plain  # the outer context is still on
        ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)(module, q, k, v, mask, scaling=0.25)
        assert calls == [1, 1]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is plain
    torch.testing.assert_close(seen["out"][0], sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])


def test_the_candidates_pass_packs_every_layer_and_scores_the_same(tiny_models, monkeypatch):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl")).eval()
    model.set_attn_implementation("sdpa")
    text = model.config.get_text_config()
    assert text.num_key_value_heads < text.num_attention_heads  # GQA, or there is nothing to pack
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, text.vocab_size, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the candidates' pass gets a 4D mask
    ctx = {"input_ids": ids, "attention_mask": mask}
    tok_ids = [[5, 6, 7], [5, 8], [9, 10, 11, 12], [13]]  # candidates of 1-4 tokens
    calls = []
    real = packed_gqa.packed_sdpa
    monkeypatch.setattr(packed_gqa, "packed_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = scoring.score_candidates(model, ctx, [tok_ids] * 3, layout="tree")
        assert len(calls) == text.num_hidden_layers
        monkeypatch.setattr(scoring, "packed_gqa", nullcontext)
        want = scoring.score_candidates(model, ctx, [tok_ids] * 3, layout="tree")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_packed_attention_on_cuda_matches_the_repeated_keys_in_bf16():
    """The memory-efficient kernel on both layouts, the candidates' pass's shapes on the 3B (16 query
    heads over 2 kv heads, 50 candidate tokens over a 620-token cache)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module, q, k, v, mask = _inputs("cuda", torch.bfloat16, heads=16, groups=2, length=50, cache=570, dim=128)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=128**-0.5)
    got = packed_sdpa(q, k, v, mask, scaling=128**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    assert (got == want).float().mean() > 0.99
