"""Grouped-query attention under a mask without repeating the keys and values (the candidates' pass).

With a mask, transformers' SDPA path repeats each key/value head for its query heads (`repeat_kv`:
8x on the Qwen2.5-VL-3B, 16 query heads over 2 kv heads), because torch's fused kernels take no GQA
with a mask on CUDA. In the candidates' pass of `scoring._tree` (batch 32 x ~50 candidate tokens over a
cached ~620-token prompt) that copies the whole cache 8x in every layer, and SDPA copies the repeated
tensors again into its kernel's layout: by run AL's profile about 3 of every 100 ms of a cached
prediction's kernel time, for attention that reads ~60 query rows a head.

Here each kv head's query heads are stacked along the query axis instead: (B, 16, T, D) queries become
(B, 2, 8T, D), the mask is repeated along its rows to match (once per forward, not per layer: every layer
gets the same mask tensor), and the kernel attends over the cache as it is. Every query row sees the same
keys, values and mask entries as before, so each row's softmax and sum are the same computation
(tests/test_packed_gqa.py: equal to transformers' path on the CPU; the gpu test on the memory-efficient
kernel). The repeated mask is made once per forward, as the additive and aligned bias that SDPA's kernel
takes (`additive_bias`), so no layer converts or copies it again. It costs 8x its rows, which is why this
is for short query lengths (the candidates' tokens), not a prompt's prefill: there the mask is (prompt x
prompt) and the prefill of an unpadded batch runs the flash kernel with native GQA anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MAX_PACKED_ROWS = 4096  # query rows a kv head (T x heads per group); the candidates' pass: 50 x 8 = 400

# The swap of transformers' "sdpa" entry is shared by every thread: installed by the first context in,
# put back by the last one out. Which calls pack is per thread (`_ACTIVE.memo`): a forward on another
# thread (e.g. `exp serve`'s request threads) meanwhile goes to transformers' own function.
_LOCK = threading.Lock()
_SWAP: dict = {"depth": 0, "plain": None, "local": False}
_ACTIVE = threading.local()


@contextmanager
def packed_gqa() -> Iterator[None]:
    """transformers' "sdpa" attention packs GQA query heads under a 4D mask for this thread's calls
    inside. Swapped on the global `ALL_ATTENTION_FUNCTIONS` (the modeling code looks it up at every call)
    and put back on exit; calls it does not fit (no mask, no GQA, a per-head mask, long queries, dropout,
    extra terms) go to transformers' own function unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _LOCK:
        if _SWAP["depth"] == 0:
            _SWAP["plain"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
            _SWAP["local"] = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention
        _SWAP["depth"] += 1
    outer = getattr(_ACTIVE, "memo", None)
    _ACTIVE.memo = {}  # repeated masks of this context, by (mask, repeats)
    try:
        yield
    finally:
        _ACTIVE.memo = outer
        with _LOCK:
            _SWAP["depth"] -= 1
            if _SWAP["depth"] == 0:
                if _SWAP["local"]:
                    ALL_ATTENTION_FUNCTIONS["sdpa"] = _SWAP["plain"]
                else:
                    del ALL_ATTENTION_FUNCTIONS["sdpa"]
                # `plain` stays: a call that looked `_attention` up just before the swap went back uses it


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    memo = getattr(_ACTIVE, "memo", None)
    n_rep = getattr(module, "num_key_value_groups", 1)
    fits = (
        memo is not None
        and n_rep > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and 1 < query.shape[2] * n_rep <= MAX_PACKED_ROWS
        and not dropout
        and kw.get("position_bias") is None
        and kw.get("softcap") is None
        and not kw.get("output_attentions")
    )
    if not fits:
        kw |= {"dropout": dropout, "scaling": scaling, "is_causal": is_causal}
        return _SWAP["plain"](module, query, key, value, attention_mask, **kw)
    return packed_sdpa(query, key, value, attention_mask, scaling, memo), None


def packed_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None = None,
    memo: dict | None = None,
) -> torch.Tensor:
    """SDPA of (B, Hq, T, D) queries over (B, Hkv, L, D) keys/values under a (B, 1, T, L) mask, as
    transformers' sdpa function returns it: (B, T, Hq, D). Query head h belongs to kv head h // (Hq/Hkv),
    as in `repeat_kv`; stacked, head g*n + r's token t is row r*T + t of group g, whose mask row is t."""
    bsz, heads, length, dim = query.shape
    groups = key.shape[1]
    n_rep = heads // groups
    packed = query.reshape(bsz, groups, n_rep * length, dim)
    cache_key = (mask.data_ptr(), tuple(mask.shape), mask.dtype, n_rep, query.dtype)
    held = memo.get(cache_key) if memo is not None else None
    if held is None:
        # (B, 1, n_rep * T, L): row r*T + t is mask row t. The mask is held beside it, so no other
        # tensor can take its address (the memo's key) while the memo lives.
        held = (mask, additive_bias(mask.repeat(1, 1, n_rep, 1), query.dtype))
        if memo is not None:
            memo[cache_key] = held
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=held[1], scale=scaling)
    # (B, Hkv, n_rep * T, D) -> (B, T, Hq, D) in one copy: row r*T + t of group g is head g*n_rep + r.
    # The kernel's output is (B, n_rep * T, Hkv, D) in memory on CUDA, where the reshape copies; where it
    # is not (CPU), the reshape is a view and `contiguous` makes the one copy.
    out = out.view(bsz, groups, n_rep, length, -1).permute(0, 3, 1, 2, 4)
    return out.reshape(bsz, length, heads, -1).contiguous()


MEM_EFFICIENT_ALIGN = 16  # torch's memory-efficient kernel copies a bias whose rows are not 16 elements apart


def additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive bias SDPA turns it into at every call (0 where a key is
    seen, -inf where not; a float mask as it is), made once, in `dtype`, with each row's storage padded
    to 16 elements. Run AU's profile of the candidates' pass (batch 32, 392 packed rows over 615 keys) had
    torch convert the boolean mask and copy it into an aligned buffer in every layer: 36 x 72 us a batch,
    1.3% of a cached prediction's kernel time. A view of the first L columns: the same values SDPA saw."""
    length = mask.shape[-1]
    store = torch.zeros(
        *mask.shape[:-1], length + (-length % MEM_EFFICIENT_ALIGN), dtype=dtype, device=mask.device
    )
    bias = store[..., :length]
    if mask.dtype == torch.bool:
        bias.masked_fill_(~mask, float("-inf"))
    else:
        bias.copy_(mask)
    return bias
