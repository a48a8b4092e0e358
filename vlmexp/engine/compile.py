"""Decoder layers through torch.compile (speed.compile=true): fewer, fused kernels per training step.

An eager decoder layer launches a kernel for every norm, rope, activation and each of LoRA's small
matmuls; compiled, they fuse and the step launches far fewer kernels. Only the decoder layers, e.g.
Qwen2_5_VLDecoderLayer, not the vision blocks: with the feature cache the tower runs once per image,
and inductor failed on them on an H200 (torch 2.11, dynamic shapes: "NameError: name 's0' is not
defined" in the generated cuDNN attention call). The vision tower's own compile, with static shapes
per image bucket, is `vision_speed.compile_vision_blocks`.

Shapes (`dynamic_shapes`): static by default. The training collator pads batches to the widths of
`engine/buckets.py` and fills short batches, so a run meets a handful of shapes, each compiled once
(8 compilations, 32.7 s of a 3B demo run; whole run 188.4 s, run S in docs/performance.md).
`speed.compile_dynamic=true` compiles one graph for every batch width and size instead; it needs
cuDNN's attention off (the default), where inductor's dynamic shapes failed. On the 3B demo run it
was slower: not finished after 230 s (run W), while its tiny-model loss equals eager's on CUDA.
`engine/speed.py` applies this once per base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from vlmexp.models.parts import unwrap

_BLOCKS = ("DecoderLayer",)
COMPILE_PAD_MULTIPLE = 64  # batches are padded to a multiple of this many tokens when compiling
# Shapes one run's decoder layers meet in training: the bucket ladder's widths (a few of its 24 up to
# 8192 tokens) at the batch size. Prediction runs them eagerly (`eager_blocks`). Dynamo's default
# limit of 8 was hit in fold 0 on an H200 (run O); each shape compiles once per run and every later
# fold reuses it.
RECOMPILE_LIMIT = 64


def dynamic_shapes(cfg) -> bool:
    """Whether the decoder layers compile with dynamic shapes (`speed.compile_dynamic`): one graph for
    every batch width and size, so batches need no bucket widths or filled rows. Not with cuDNN's
    attention (`speed.cudnn_attention=true`): inductor's dynamic-shape cuDNN attention call is the one
    that failed ("NameError: name 's0' is not defined", H200, torch 2.11)."""
    return bool(cfg.speed.compile_dynamic) and not cfg.speed.cudnn_attention


def compile_blocks(model: torch.nn.Module, dynamic: bool = False) -> int:
    """torch.compile every decoder layer in place (speed.compile=true), so norms, rope, activations and
    LoRA's small matmuls fuse and the step launches far fewer kernels. Layers of one class share code,
    so the 36 decoder layers of a 3B model compile once for every shape (`dynamic=True`), or once per
    batch shape (static, see `dynamic_shapes`), with batches padded to bucket widths so a run sees a
    handful of lengths (400-700 tokens: 5). Returns the count."""
    allow_recompiles(RECOMPILE_LIMIT)
    n = 0
    for module in unwrap(model).modules():
        if type(module).__name__.endswith(_BLOCKS) and not getattr(module, "_vlmexp_compiled", False):
            module.compile(dynamic=dynamic)
            module._vlmexp_compiled = True
            n += 1
    return n


def allow_recompiles(limit: int) -> None:
    """Raise dynamo's per-function recompile limit (default 8) to at least `limit`, never lower it: the
    decoder layers and the vision blocks each ask for what their bucketed shapes need."""
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)


@contextmanager
def eager_blocks(model: torch.nn.Module) -> Iterator[None]:
    """The compiled decoder layers run eagerly inside (prediction), compiled again after (training).

    A forward with a KV cache (label scoring's candidate pass, generation) hands every layer the whole
    cache object, and dynamo guards on each layer's cache tensors: layer 25 sees layers 0-24 already
    extended (626 positions) and 25-35 not (512), so each layer position is a new guard set and
    prediction recompiled until dynamo's limit (64, hit in fold 0 on an H200, run Q), most of the
    run's 72 s of compilation. Eager prediction compiles nothing and gives the same probabilities."""
    layers = [m for m in unwrap(model).modules() if getattr(m, "_vlmexp_compiled", False)]
    stashed = [(m, m._compiled_call_impl) for m in layers]
    for m, _ in stashed:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in stashed:
            m._compiled_call_impl = impl


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks`: the layers run eagerly again (the bench compares rows on one model)."""
    for module in model.modules():
        if module.__dict__.pop("_vlmexp_compiled", False):
            module._compiled_call_impl = None
