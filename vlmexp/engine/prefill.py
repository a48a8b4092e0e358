"""The prompt's prefill for label scoring: only the work whose result something reads.

`scoring.score_candidates` encodes each prompt once and reads two things from it: the next-token
logits at the last position, and every layer's keys and values (the candidates' pass attends to them).
transformers' forward computes more than that, and three levers here leave the surplus out:

- `last_position_only`: in the LAST decoder layer, keys and values are needed for every position (they
  go to the cache), but its attention output projection and MLP only for the last one, the only
  position the LM head reads. On the Qwen2.5-VL-3B (36 layers, 2048 wide, MLP 11008) that is 72M of
  the layer's 83M FLOPs a token, ~2.4% of a 570-token prefill. Done with forward pre-hooks that cut
  the o_proj's and the MLP's input to the last position: their (B, 1, D) outputs broadcast over the
  layer's residual add, so the layer's output is right at the last position and never read elsewhere.
  No family's decoder layer is re-implemented, and a layer whose projection is named otherwise (e.g.
  Qwen3.5's linear attention) just keeps it whole.
- `prefill_cache`: transformers' `DynamicLayer` starts empty and concatenates every update onto what
  it holds, so the prefill copies each layer's keys and values once more into the cache (batch 32 x
  570 tokens on the 3B: 20 MB a layer; run AL's profile put all cache concatenation at 2.4% of a cached
  prediction's kernel time, half of it this copy). Its first update here keeps the tensors as given.
- `unchecked_placeholders`: Qwen-VL's forward checks that the image tokens match the features by
  reading their count back from the GPU (`get_placeholder_mask`: two host syncs a batch, each leaving
  the GPU idle until the host queues work again). Features from the run's cache were placed by the
  run's own encoder (or, without the caches, by the processor together with the tokens), so the scoring
  prefill asks for the same masks without the check; training keeps it.

All three give the same numbers as the plain forward (tests/test_prefill.py, and every family's scoring
against full-sequence scoring in tests/test_engine_predict.py).
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from vlmexp.models.parts import unwrap

# Per thread: the hooks are on shared modules, and a forward of the same model on another thread (any
# caller outside this context, e.g. a candidates' pass) must see the whole layer.
_LAST_ONLY = threading.local()


def last_decoder_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The language model's last decoder layer (e.g. `Qwen2_5_VLDecoderLayer` 35 of the 3B), or None
    where the model has no `get_decoder().layers`."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers[-1] if layers is not None and len(layers) else None


@contextmanager
def last_position_only(model: torch.nn.Module) -> Iterator[None]:
    """This thread's forwards inside compute the last decoder layer's attention output projection and
    MLP for the last position only (module doc). For a forward whose logits are read at the last
    position only (`logits_to_keep` = the last index) and whose cache is read whole."""
    layer = last_decoder_layer(model)
    attn = getattr(layer, "self_attn", None)
    targets = [m for m in (getattr(attn, "o_proj", None), getattr(layer, "mlp", None)) if m is not None]
    handles = [m.register_forward_pre_hook(_cut_to_last, with_kwargs=True) for m in targets]
    try:
        with _on_this_thread(_LAST_ONLY):
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _on_this_thread(flag: threading.local) -> Iterator[None]:
    """`flag.on` is True on this thread inside, and as it was before after (contexts nest)."""
    outer = getattr(flag, "on", False)
    flag.on = True
    try:
        yield
    finally:
        flag.on = outer


def _cut_to_last(_module, args, kwargs):
    """(B, L, D) input -> (B, 1, D), its last position. Idempotent: two threads' hooks on one module
    cut once. Other threads' calls pass as they are."""
    if not getattr(_LAST_ONLY, "on", False):
        return None
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3:
        return (args[0][:, -1:], *args[1:]), kwargs
    x = kwargs.get("hidden_states", kwargs.get("x"))
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        key = "hidden_states" if "hidden_states" in kwargs else "x"
        return args, kwargs | {key: x[:, -1:]}
    return None


class KeepFirstLayer(DynamicLayer):
    """A `DynamicLayer` whose first update keeps the keys and values as given instead of concatenating
    them onto an empty tensor (a copy); later updates concatenate as usual. The kept tensors are the
    attention's own fresh keys (after RoPE) and values, which nothing writes to afterwards."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_initialized:
            return super().update(key_states, value_states, *args, **kwargs)
        # transformers' own lazy initialisation on zero positions, whatever its signature in this version
        super().update(key_states[..., :0, :], value_states[..., :0, :], *args, **kwargs)
        self.keys, self.values = key_states, value_states
        return self.keys, self.values


def prefill_cache(model: torch.nn.Module) -> DynamicCache | None:
    """The cache a prefill would make (`DynamicCache(config=...)`), its plain full-attention layers
    keeping their first update (`KeepFirstLayer`); None where any layer is another kind (Gemma 3's
    sliding window, Qwen3.5's recurrent states), for which the model makes its own."""
    cache = DynamicCache(config=unwrap(model).config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    for layer in cache.layers:
        # A fresh layer of ours, so switching its class changes nothing else; it keeps whatever the
        # config gave it (no state of its own is added).
        layer.__class__ = KeepFirstLayer
    return cache


_UNCHECKED = threading.local()


@contextmanager
def unchecked_placeholders(model: torch.nn.Module) -> Iterator[None]:
    """This thread's forwards inside get the image/video placeholder masks without the count check that
    reads a GPU count back (module doc). For models whose `get_placeholder_mask` checks only when given
    the features (`image_features=None` by default: Qwen2/2.5/3-VL); others are left as they are."""
    core = getattr(unwrap(model), "model", None)
    if not _checks_only_given_features(type(core)):
        yield
        return
    if "get_placeholder_mask" not in vars(core):
        # Once per model and kept: a bound method shadowing the class's, which passes every other thread's
        # (and every later) call through unchanged; bound, so a deep copy of the model binds its copy.
        core.get_placeholder_mask = types.MethodType(_placeholder_mask, core)
    with _on_this_thread(_UNCHECKED):
        yield


@functools.cache
def _checks_only_given_features(cls: type) -> bool:
    """Whether `cls.get_placeholder_mask` takes `image_features=None` (it checks only when given them);
    once per class, not at every prefill."""
    method = getattr(cls, "get_placeholder_mask", None)
    param = inspect.signature(method).parameters.get("image_features") if method is not None else None
    return param is not None and param.default is None


def _placeholder_mask(self, *args, **kwargs):
    """The class's `get_placeholder_mask`, without the features (so without the check) on a thread inside
    `unchecked_placeholders`: the same masks."""
    if getattr(_UNCHECKED, "on", False):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("image_features", "video_features")}
    return type(self).get_placeholder_mask(self, *args, **kwargs)
