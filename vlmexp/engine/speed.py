"""The model prepared for speed once per run: the CUDA-only levers, applied once per base model.

Training (`engine/trainer.py` `build_trainer`), prediction (`engine/predict.py` `predict`) and the vision
pre-pass (`engine/vision_prepass.py`) call `prepare(model, cfg)`. On CUDA it applies, each equal in
result to the plain model:
- the batched vision window attention (`vision_speed.patch_vision_attention`; `vision_patch=False`
  keeps the stock window loop, for the bench's rows),
- the vision tower levers `speed.vision_pad` and `speed.vision_compile` (`vision_speed.prepare_tower`,
  which does nothing when the run trains the tower: lora.vision=true or finetune=full),
- the RMSNorms as torch's fused kernel when `speed.fused_norm` (`fused_norm.fuse_norms`),
- SwiGLU and RoPE as liger-kernel's fused kernels when `speed.liger` and nothing compiles (`liger_ops.fuse`),
- torch.compile of the decoder layers when `speed.compile` (`compile.compile_blocks`),
and records what it applied on the unwrapped base module (attribute `_vlmexp_speed`, {lever: count}).
Every later call on a model over the same base returns that record and changes nothing: the fold's
validation and test predictions on its trained model, and with `speed.reuse_base` (`models/base_once.py`)
every later fold's adapter on the run's one base, so a run prepares its base once and logs it once
("speed levers: vision_attention=32 vision_pad=32 fused_norm=138 compile=36" for the 3B: its
vision blocks' and decoder layers' norms). A fold that loads its own model (speed.reuse_base=false,
full fine-tunes) has a new base, prepared anew.

A later call that asks for other levers (another `cfg.speed`, `vision_patch=False` after True) keeps
the first decision and says so at debug level: levers are not taken off a live model here. The bench,
which compares levers on one model, undoes them itself (`compile.uncompile_blocks`, the patched
forwards dropped) and then calls `forget` so the next row is prepared by its own settings. Off CUDA
nothing is applied and nothing recorded (a model moved to the GPU later is still prepared there).

Not here, per fold: gradient checkpointing (`memory.gradient_checkpointing_needed`, through
`train_args.sft_config`) and train.batch_size=auto (`autobatch.resolve`) depend on the fold's batch
shape and the free GPU memory, so `build_trainer` decides them every time. The other levers of a run
live with what they serve: encoded rows (`encode.py`), the vision feature cache (`vision_cache.py`),
length buckets (`buckets.py`), KV-shared label scoring (`scoring.py`).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmexp.engine import liger_ops
from vlmexp.engine.compile import compile_blocks, dynamic_shapes
from vlmexp.engine.fused_norm import fuse_norms
from vlmexp.engine.vision_speed import patch_vision_attention, prepare_tower
from vlmexp.models.parts import unwrap

log = logging.getLogger(__name__)

_APPLIED = "_vlmexp_speed"  # {lever: count} on the base module, once prepared
_ASKED = "_vlmexp_speed_asked"  # the settings that first call asked for, to tell a different later ask


def on_cuda(model: torch.nn.Module) -> bool:
    """Whether the levers apply: CUDA is there and the model's weights are on it."""
    return torch.cuda.is_available() and next(model.parameters()).is_cuda


def compiles(model: torch.nn.Module, cfg) -> bool:
    """Whether `prepare` compiles `model`'s decoder layers (speed.compile, model on CUDA): what sizes a
    training step for them asks, e.g. the collator's bucket widths and the compiled memory estimate."""
    return bool(cfg.speed.compile) and on_cuda(model)


def prepared(model: torch.nn.Module) -> dict | None:
    """What `prepare` applied to `model`'s base, or None when it has not prepared it."""
    return unwrap(model).__dict__.get(_APPLIED)


def prepare(model: torch.nn.Module, cfg, *, vision_patch: bool = True) -> dict:
    """Apply the CUDA levers `cfg.speed` switches on to `model`'s base, once; {lever: count} applied
    (the first call's record on every later call; {} off CUDA). See the module docstring."""
    base = unwrap(model)
    asked = {
        "vision_patch": vision_patch,
        "vision_pad": cfg.speed.vision_pad,
        "vision_compile": cfg.speed.vision_compile,
        "compile": cfg.speed.compile,
        "compile_dynamic": dynamic_shapes(cfg),
        "fused_norm": cfg.speed.fused_norm,
        "liger": cfg.speed.liger,
    }
    done = base.__dict__.get(_APPLIED)
    if done is not None:
        first = base.__dict__.get(_ASKED)
        if first != asked:
            log.debug(
                "speed levers already applied for %s; keeping them (this call asked for %s)", first, asked
            )
        return done
    if not on_cuda(model):
        return {}
    done = {}
    if vision_patch:
        done["vision_attention"] = patch_vision_attention(model)
    done |= prepare_tower(model, cfg)
    if cfg.speed.fused_norm:
        done["fused_norm"] = fuse_norms(model)
    if cfg.speed.liger and not compiles(model, cfg) and not cfg.speed.vision_compile:
        # compiled layers fuse this elementwise work themselves; dynamo is not asked to trace Triton
        done |= liger_ops.fuse(model)
    if compiles(model, cfg):
        done["compile"] = compile_blocks(model, dynamic=dynamic_shapes(cfg))
    base.__dict__[_APPLIED], base.__dict__[_ASKED] = done, asked
    log.info("speed levers: %s", " ".join(f"{k}={v}" for k, v in done.items()) or "none")
    return done


# Every SDPA backend but cuDNN's, in torch's own order of preference.
_NOT_CUDNN = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_backends(cfg) -> AbstractContextManager:
    """The SDPA backends the run's forwards may use (training steps, validation, prediction, the vision
    pre-pass enter this). With `speed.cudnn_attention=false`, cuDNN's is left out: on an H200 torch
    picks it first, and it builds (and caches) an execution graph for each new input shape on the CPU.
    A run meets new shapes all through fold 0: batch lengths vary (e.g. 512-700 tokens), and the vision
    tower's windows and images come in about 20 sizes on the demo. Under py-spy (run T,
    docs/performance.md) the decoder's sdpa calls took ~2.8 ms of main-thread time each, against
    ~0.4 ms for a linear layer, and the tower's 9 s. Measured in one call on the 3B demo run (run U):
    fold 0 trained in 26.0 s without cuDNN against 35.2 s with it, later folds alike, the whole run
    150.1 s against 164.5, the same CV. Flash and memory-efficient attention compute the same
    attention (within bf16 rounding)."""
    return nullcontext() if cfg.speed.cudnn_attention else sdpa_kernel(list(_NOT_CUDNN))


def forget(model: torch.nn.Module) -> None:
    """Drop the record, so the next `prepare` applies levers again (the bench, after undoing them)."""
    base = unwrap(model)
    base.__dict__.pop(_APPLIED, None)
    base.__dict__.pop(_ASKED, None)
