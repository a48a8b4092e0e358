"""Log-likelihood of every candidate label after a prompt: one prefill, then all candidates at once.

The prompt (and image) is encoded once. The candidates' tokens then run in one more forward over
that KV cache, in one of two layouts:

- `tree` (sdpa and eager attention): each row's candidates sit side by side in ONE sequence after its
  prompt, e.g. 25 labels x 2 tokens = 50 tokens, under a 4D mask where a candidate's token sees the
  prompt and its own earlier tokens only, and every candidate starts at the same position. The cache
  stays (B, L): nothing is copied. At batch 32 x 25 labels x 570 tokens the other layout copies the
  3B model's cache 25 times (~17 GB across 36 layers) and concatenates onto it again: on an H200 that
  was about half of prediction's GPU time (docs/performance.md).
- `repeat` (any other attention, e.g. flash_attention_2, which takes no 4D mask; and any model with
  layers that are not full attention): the cache repeated n times and the B*n candidates as a batch of
  their own. Side by side in one sequence, candidates would leak into each other through a recurrent
  layer (Qwen3.5's gated delta net reads its input in order, whatever the mask says), and a sliding
  window layer (Gemma 3/4) keeps only its window of the prompt in the cache (16 of 197 tokens in the
  tiny Gemma 3), which a mask over the whole prompt does not fit.

Both equal scoring prompt + candidate from scratch (tests/test_engine_predict.py).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import nullcontext

import torch

from vlmexp.engine.batching import rope_index_fn
from vlmexp.engine.packed_gqa import packed_gqa
from vlmexp.engine.prefill import last_position_only, prefill_cache, unchecked_placeholders
from vlmexp.engine.transfer import long_tensor


def score_candidates(
    model,
    ctx: dict,
    candidates: list[list[list[int]]],
    pad_id: int | None = None,
    layout: str = "auto",
    on_device: bool = False,
    unpadded: bool = False,
) -> torch.Tensor:
    """Summed log-probabilities (B, n), on the CPU, of each row's n candidate token-id sequences after
    its left-padded context `ctx` (processor output on the model's device; `mm_encoder_outputs` may
    stand in for `pixel_values`, e.g. features a `vision_cache.VisionFeatureCache` computed earlier).
    `layout`: tree, repeat, or auto (tree where the attention takes a 4D mask). `on_device`: left on the
    model's device, still being computed: the `tree` layout queues its work without a host sync, so the
    caller can build the next batch meanwhile (`predict.predict`). `unpadded`: the caller saw on the CPU
    that no row of the mask is padding, so the prefill runs without it (transformers would otherwise read
    the GPU mask back to find out, a host sync a batch)."""
    mask = ctx["attention_mask"]
    # Checked where it costs no host sync: a CPU mask, or a result read at once anyway. `on_device` on a
    # GPU is predict's own pipelined path, whose batches are left-padded by construction (`_context`).
    if (mask.device.type == "cpu" or not on_device) and bool((mask[:, -1] == 0).any()):
        raise ValueError("score_candidates needs left-padded contexts: encode with padding_side='left'")
    n = len(candidates[0])
    if any(len(c) != n for c in candidates) or any(not s for c in candidates for s in c):
        raise ValueError("every row needs the same number of candidates, each of at least one token")
    attn = _attn_implementation(model)
    if layout == "auto":
        layout = "tree" if attn in ("sdpa", "eager") and _all_full_attention(model) else "repeat"
    if layout not in ("tree", "repeat"):
        raise ValueError(f"layout={layout!r}: choose tree, repeat or auto")
    positions, next_pos = _positions(model, ctx)
    ctx = {k: v for k, v in ctx.items() if k != "position_ids"}
    # The last position as an index, not logits_to_keep=1: `hidden[:, -1:]` is a strided view, and
    # torch 2.11's matmul ran the LM head on it as a batched GEMV that read the 152k x 2048 weight once
    # per row (4.6 ms a batch of 32 on an H200, run AL's profile); the indexed copy is contiguous, one GEMM.
    last = long_tensor([ctx["input_ids"].shape[1] - 1], mask.device)
    if mask.device.type == "cpu":  # known here without a sync: the mask itself, not the caller's word
        unpadded = bool(mask.all())
    # The prefill computes what is read of it only (prefill.py): the last layer's output at the last
    # position, and a cache that holds the prompt's keys and values without copying them. Without a
    # padding mask where no row is padded (tree layout: plain causal attention in every layer), the
    # same causal attention as with an all-ones mask.
    cache = prefill_cache(model) if layout == "tree" else None
    if layout == "tree" and unpadded:
        ctx = {k: v for k, v in ctx.items() if k != "attention_mask"}
    with last_position_only(model), unchecked_placeholders(model):
        out = model(
            **ctx,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=last,
            **(_cache_arg(model, cache) if cache is not None else {}),
        )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    device = first.device
    firsts = long_tensor([[s[0] for s in cands] for cands in candidates], device)
    loglik = first.gather(1, firsts)  # (B, n)
    if max(len(s) for cands in candidates for s in cands) > 1:
        run = _tree if layout == "tree" else _repeat
        rest = run(model, _returned_cache(out), mask, positions, next_pos, candidates, pad_id, attn)
        loglik = loglik + rest
    return loglik if on_device else loglik.cpu()


def _tree(model, cache, ctx_mask, positions, next_pos, candidates, pad_id, attn) -> torch.Tensor:
    """Every row's candidates side by side in one sequence after the cached prompt (see module doc).
    Queued without a host sync: every index is built on the CPU from the candidates' lengths (a boolean
    mask over GPU logits, `logits[real]`, would wait for the whole batch to finish)."""
    device, n = ctx_mask.device, len(candidates[0])
    # Inputs s[:-1] predict targets s[1:]; a one-token candidate adds nothing here.
    spans = [[(s[:-1], s[1:]) for s in cands] for cands in candidates]
    width = max(sum(len(i) for i, _ in row) for row in spans)
    bsz, ctx_len = ctx_mask.shape
    pad = pad_id if pad_id is not None else 0
    # Built as Python lists, then one tensor each: 32 rows x 25 labels of tiny tensors cost ~10 ms.
    cols: dict[str, list[list[int]]] = {"inp": [], "owner": [], "offset": []}
    # The real candidate tokens, flat: their place in the (B * width) logits, their target token and
    # the (row * n + candidate) score they add to.
    at: list[int] = []
    targets: list[int] = []
    score: list[int] = []
    for b, row in enumerate(spans):
        inp = [t for i, _ in row for t in i]
        fill = width - len(inp)
        cols["inp"].append(inp + [pad] * fill)
        cols["owner"].append([c for c, (i, _) in enumerate(row) for _ in i] + [-1] * fill)
        cols["offset"].append([j for i, _ in row for j in range(len(i))] + [0] * fill)
        at += range(b * width, b * width + len(inp))
        targets += [t for _, o in row for t in o]
        score += [b * n + c for c, (i, _) in enumerate(row) for _ in i]
    inp, owner, offset = (long_tensor(cols[k], device) for k in cols)
    at, targets, score = (long_tensor(v, device) for v in (at, targets, score))
    real = owner >= 0
    # Token q sees token k of the candidates when both belong to the same candidate and k <= q;
    # padding queries see the prompt only (their outputs are dropped), so no row of the mask is empty.
    same = (owner[:, :, None] == owner[:, None, :]) & real[:, :, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    cand_mask = same & causal
    prompt_mask = ctx_mask.bool()[:, None, :].expand(bsz, width, ctx_len)
    mask = torch.cat([prompt_mask, cand_mask], dim=-1)[:, None]  # (B, 1, width, ctx_len + width)
    if attn == "eager":  # eager attention adds the mask to its scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    pos = next_pos[:, None] + offset  # every candidate starts right after the prompt
    if positions.dim() == 3:  # M-RoPE (3, B, L): a text token has the same position on all three axes
        pos = pos[None].expand(positions.shape[0], -1, -1)
    # sdpa: the query heads of each kv head stacked, the cache attended as it is (packed_gqa.py)
    with packed_gqa() if attn == "sdpa" else nullcontext():
        out = model(input_ids=inp, attention_mask=mask, position_ids=pos, **_cache_arg(model, cache))
    logits = out.logits.flatten(0, 1)
    # Only real candidate tokens go to fp32: 25 labels x batch 32 x 152k vocab is 0.5 GB a position. Where
    # every row is as wide as the widest (one label set, the usual case) all of them are real.
    sel = logits if len(targets) == logits.shape[0] else logits.index_select(0, at)
    picked = _target_logprobs(sel, targets)
    rest = torch.zeros(bsz * n, dtype=picked.dtype, device=device)
    rest.index_put_((score,), picked, accumulate=True)  # deterministic on CUDA, unlike index_add_
    return rest.view(bsz, n)


def _repeat(model, cache, ctx_mask, positions, next_pos, candidates, pad_id, attn) -> torch.Tensor:
    """The cache repeated n times; all B*n candidates' remaining tokens as one batch after it."""
    device, n = ctx_mask.device, len(candidates[0])
    suffixes = [s for cands in candidates for s in cands]  # row b's candidates are b*n .. b*n+n-1
    width = max(len(s) for s in suffixes) - 1
    inp = torch.full((len(suffixes), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    targets = torch.zeros_like(inp)
    mask = torch.zeros_like(inp)
    for i, s in enumerate(suffixes):
        inp[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, : len(s) - 1] = torch.tensor(s[1:])
        mask[i, : len(s) - 1] = 1
    inp, targets, mask = inp.to(device), targets.to(device), mask.to(device)
    _repeat_cache(cache, n)
    pos = next_pos.repeat_interleave(n).unsqueeze(-1) + torch.arange(width, device=device)  # (B*n, width)
    if positions.dim() == 3:
        pos = pos.unsqueeze(0).expand(positions.shape[0], -1, -1)
    full_mask = torch.cat([ctx_mask.repeat_interleave(n, dim=0), mask], dim=1)
    logits = model(
        input_ids=inp, attention_mask=full_mask, position_ids=pos, **_cache_arg(model, cache)
    ).logits
    real = mask.bool()
    picked = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    picked[real] = _target_logprobs(logits[real], targets[real])  # (real tokens, V) -> (real tokens,)
    return picked.sum(-1).view(len(candidates), n)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 log-probability of each row's target token under its (tokens, V) logits, by a log_softmax
    that casts inside its kernel: one read of the bf16 logits and one fp32 write, where a cast then
    logsumexp made five passes over the fp32 copy (2.5 ms a batch of 32 x 25 labels, run AU)."""
    return (
        torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    )


def _repeat_cache(cache, n: int) -> None:
    """`cache.batch_repeat_interleave(n)`, also for recurrent layers, whose cache class lacks it in
    transformers 5.24 (Qwen3.5's LinearAttentionLayer: conv and recurrent states per layer, e.g.
    (B, 4096, 4) and (B, 32, 128, 128) in the 9B), which are repeated here the same way."""
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(n)
            continue
        for name in ("conv_states", "recurrent_states"):
            states = getattr(layer, name)
            keys = states.keys() if isinstance(states, dict) else range(len(states))
            for i in list(keys):
                if isinstance(states[i], torch.Tensor):
                    states[i] = states[i].repeat_interleave(n, dim=0)


def _cache_arg(model, cache) -> dict:
    """The KV cache under the name this transformers takes: `cache` from 5.24 (`past_key_values` still
    works there but warns at every call), `past_key_values` before."""
    base = getattr(model, "get_base_model", lambda: model)()
    return {_cache_name(type(base)): cache}


@functools.cache
def _cache_name(cls: type) -> str:
    """`cls.forward`'s name for the cache, looked up once per class: every prefill and candidates' pass
    passes a cache."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The forward's KV cache: `out.cache` from transformers 5.24, whose `past_key_values` still works but
    logs a deprecation warning in every run; `out.past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _all_full_attention(model) -> bool:
    """Whether every decoder layer is plain full attention, e.g. not Gemma 3's
    ["sliding_attention", ..., "full_attention"] nor Qwen3.5's ["linear_attention", ...]."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or ())


def _attn_implementation(model) -> str:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", ""))


def _positions(model, ctx: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids for the left-padded context and the next position of each row, (B,).

    Explicit positions make a left-padded row see exactly the positions it would see alone, and let
    the candidates continue from the cache at the right place. For Qwen-VL's 3D M-RoPE the context
    positions come from the model's own `get_rope_index` (or `encode.Encoder`, which ran it once per
    prompt on the CPU); text after it continues at max + 1.
    """
    mask = ctx["attention_mask"]
    if "position_ids" in ctx:
        positions = ctx["position_ids"]
        return positions, positions.amax(dim=(0, 2)) + 1
    fn = rope_index_fn(model)
    if fn is not None and "mm_token_type_ids" in ctx:
        keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
        positions, deltas = fn(
            input_ids=ctx["input_ids"],
            mm_token_type_ids=ctx["mm_token_type_ids"],
            attention_mask=mask,
            **{k: ctx[k] for k in keys if k in ctx},
        )
        return positions, mask.sum(-1) + deltas.view(-1).to(mask.device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions, mask.sum(-1)
