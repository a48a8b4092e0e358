"""Fast-path pieces for training and prediction, each equal in result to the plain path.

- `answer_only_loss`: logits and cross-entropy only at supervised positions. The plain path computes
  (batch x tokens x vocab) logits, e.g. 8 x 570 x 151936 in fp32 = 2.8 GB, to use ~4 positions a sample.
- `patch_vision_attention`: Qwen-VL vision towers under sdpa loop over every attention window in Python
  (8 images at 448 px = 128 windows x 28 window layers = 3584 tiny kernel calls a forward); windows of
  equal length go through one batched sdpa call instead.
- `gradient_checkpointing_needed`: checkpointing only when activations would not fit in free memory.
- `VisionFeatureCache`: a frozen vision tower gives the same features for an image every epoch and fold.

The project's trainer (`engine/train.py`) uses the checkpointing decision and the vision patch; the
answer-only loss is trl 1.16's own there (`SFTTrainer` projects only supervised positions through the
LM head on CUDA), so `answer_only_loss` serves loops outside the trainer (the QLoRA memory bench).
KV-shared label scoring lives in `engine/predict.py` (`score_candidates`), the one implementation.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmexp.models.lora import classify
from vlmexp.timing import phase

IGNORE = -100


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _vlm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = unwrap(model)
    core, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if core is None or head is None or not hasattr(core, "language_model"):
        raise TypeError(
            f"{type(base).__name__}: the fast path needs a *ForConditionalGeneration model with .model "
            "(vision + language) and .lm_head, e.g. Qwen2_5_VLForConditionalGeneration; use the plain path"
        )
    return core, head


def answer_only_loss(
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch: int | torch.Tensor | None = None,
    mm_encoder_outputs: dict | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `inputs["labels"]`, equal to `model(**inputs).loss` (mean over supervised
    tokens, or their sum / `num_items_in_batch` as transformers does under gradient accumulation), with
    the lm_head applied only where a label is supervised."""
    core, head = _vlm_parts(model)
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    if mm_encoder_outputs is not None:
        batch.pop("pixel_values", None)
        batch["mm_encoder_outputs"] = mm_encoder_outputs
    hidden = core(**batch, use_cache=False).last_hidden_state
    targets = inputs["labels"][:, 1:].to(hidden.device)
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()  # (answer tokens, vocab), e.g. (32, 151936)
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / denom


# -- vision attention ---------------------------------------------------------------------------
_PATCHABLE = {"Qwen2_5_VLVisionAttention", "VisionAttention"}  # Qwen2.5-VL, Qwen2-VL


def _batched_window_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    # Same computation as the module's own non-flash branch, with windows of equal length batched:
    # (1, heads, S, d) -> (n_windows, heads, L, d). 448 px: 16 windows of 64 patches per image.
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._vlmexp_rope(q, k, cos, sin)  # (S, heads, d)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outs, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, span = j - i, lengths[i] * (j - i)
        qkv = [
            t[start : start + span].reshape(n, lengths[i], self.num_heads, -1).transpose(1, 2)
            for t in (q, k, v)
        ]
        o = F.scaled_dot_product_attention(*qkv, scale=self.scaling)  # (n, heads, L, d)
        outs.append(o.transpose(1, 2).reshape(span, -1))
        start, i = start + span, j
    return self.proj(torch.cat(outs) if len(outs) > 1 else outs[0])


def patch_vision_attention(model: torch.nn.Module) -> int:
    """Batch the vision tower's windowed attention (sdpa/eager only; flash-attention already packs).
    Patches instances, not the class, so other models in the process are untouched. Returns the count."""
    patched = 0
    for module in unwrap(model).modules():
        if type(module).__name__ not in _PATCHABLE or not hasattr(module, "qkv"):
            continue
        if "flash" in (module.config._attn_implementation or ""):
            continue
        module._vlmexp_rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        module.forward = types.MethodType(_batched_window_forward, module)
        patched += 1
    return patched


# -- compilation --------------------------------------------------------------------------------
# Decoder layers only, e.g. Qwen2_5_VLDecoderLayer. Not the vision blocks: with the feature cache the
# tower runs once per image, and inductor failed on them on an H200 (torch 2.11, dynamic shapes:
# "NameError: name 's0' is not defined" in the generated cuDNN attention call).
_BLOCKS = ("DecoderLayer",)
COMPILE_PAD_MULTIPLE = 64  # batches are padded to a multiple of this many tokens when compiling


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer in place (speed.compile=true), so norms, rope, activations and
    LoRA's small matmuls fuse and the step launches far fewer kernels. Layers of one class share code,
    so the 36 decoder layers of a 3B model compile once per batch length; static shapes (dynamic ones
    hit the inductor bug above), with batches padded to COMPILE_PAD_MULTIPLE tokens so a run sees a
    handful of lengths (400-700 tokens: 5). Returns the count."""
    n = 0
    for module in unwrap(model).modules():
        if type(module).__name__.endswith(_BLOCKS) and not getattr(module, "_vlmexp_compiled", False):
            module.compile(dynamic=False)
            module._vlmexp_compiled = True
            n += 1
    return n


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks`: the layers run eagerly again (the bench compares rows on one model)."""
    for module in model.modules():
        if module.__dict__.pop("_vlmexp_compiled", False):
            module._compiled_call_impl = None


# -- gradient checkpointing ---------------------------------------------------------------------
def activation_bytes(model: torch.nn.Module, batch_size: int, tokens: int, patches: int) -> int:
    """Training memory of one step without checkpointing, bf16: activations plus the trained weights'
    gradients and AdamW moments (12 bytes a weight: nothing for LoRA, ~45 GB for a full 3B model).

    Activations per token and layer ~ 2 bytes x (16 hidden + 6 intermediate): fitted to the H200
    measurements in /work/shared/ENVIRONMENT.md (Qwen2.5-VL-3B, batch 8 x 570 tokens: ~30 GiB language,
    ~20 GiB more when the vision tower has adapters). The vision tower keeps activations only when it
    trains. `patches` is per sample (448 px in Qwen2.5-VL: 1024).
    """
    cfg = unwrap(model).config
    tc, vc = cfg.get_text_config(), getattr(cfg, "vision_config", None)
    total = 2 * (16 * tc.hidden_size + 6 * tc.intermediate_size) * tc.num_hidden_layers * tokens * batch_size
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total += 12 * sum(p.numel() for _, p in trained)
    if vc is not None and any(classify(n)[0] == "vision" for n, _ in trained):
        d = getattr(vc, "embed_dim", None) or vc.hidden_size
        inter = getattr(vc, "intermediate_size", None) or d * getattr(vc, "mlp_ratio", 4)
        depth = getattr(vc, "depth", None) or vc.num_hidden_layers  # Qwen-VL: depth; CLIP/SigLIP: layers
        total += 2 * (16 * d + 6 * inter) * depth * patches * batch_size
    return int(total)


def gradient_checkpointing_needed(
    setting: str,
    model: torch.nn.Module,
    batch_size: int,
    tokens: int,
    patches: int,
    free_bytes: int | None = None,
    margin: float = 1.3,
) -> tuple[bool, str]:
    """(use checkpointing?, why). `setting` is train.gradient_checkpointing: on, off or auto.
    auto: off on the CPU; on a GPU off when `margin` x the estimated activations fit in free memory."""
    if setting in ("on", "off"):
        return setting == "on", f"train.gradient_checkpointing={setting}"
    if free_bytes is None:
        if not torch.cuda.is_available():
            return False, "auto: CPU"
        free_bytes = torch.cuda.mem_get_info()[0]
    need = activation_bytes(model, batch_size, tokens, patches)
    fits = need * margin <= free_bytes
    why = (
        f"auto: activations ~{need / 2**30:.1f} GiB x {margin} {'fit in' if fits else 'exceed'} "
        f"{free_bytes / 2**30:.1f} GiB free"
    )
    return not fits, why


# -- vision features ----------------------------------------------------------------------------
def vision_cache_unsupported(model: torch.nn.Module) -> str | None:
    """Why the feature cache cannot serve `model`, or None when it can: the cache hands the language
    model per-image features through `mm_encoder_outputs`, which only the Qwen-VL family's forward takes
    (Qwen2/2.5/3-VL, Qwen3.5). Gemma 3/4, LLaVA and SmolVLM run their tower inside forward on
    pixel_values, so nothing computed earlier can stand in for it."""
    core = getattr(unwrap(model), "model", None)
    if getattr(core, "visual", None) is not None and hasattr(core, "get_image_features"):
        return None
    return (
        f"{type(unwrap(model)).__name__} takes no precomputed image features (its forward runs the vision "
        "tower on pixel_values itself); the vision feature cache is off for it"
    )


def vision_frozen(model: torch.nn.Module) -> bool:
    """True for a Qwen-VL-style model (`.model.visual`, features by `get_image_features`) whose vision
    tower and merger train no weight (language-only LoRA), so an image's features never change."""
    core = getattr(unwrap(model), "model", None)
    visual = getattr(core, "visual", None)
    return visual is not None and not any(p.requires_grad for p in visual.parameters())


@dataclass
class _DeepstackOutput(BaseModelOutputWithPooling):
    """What Qwen3-VL's forward reads from `mm_encoder_outputs["image"]`: the merged tokens per image
    and `deepstack_features[level][image]` (transformers' own class lives in the Qwen3-VL module)."""

    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


class VisionFeatureCache:
    """Image features of a frozen vision tower by image key (`encode.image_key`), computed once: the
    merged tokens and, for Qwen3-VL, every deepstack level the decoder layers take from the tower.

    A 5-fold run with E epochs otherwise runs the tower 4E+1 times per image. 448 px in Qwen2.5-VL-3B:
    256 x 2048 bf16 = 1 MiB per image, so 10k images take ~10 GiB on `device` (use "cpu" to spill);
    past `max_gib` new features are used but not kept. Only for one base model's tower: make a new
    cache per run (the recipe does), never share one across models."""

    def __init__(self, device: str | torch.device | None = None, max_gib: float = 16.0):
        self.device = device
        self.max_bytes = int(max_gib * 2**30)
        self._store: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def keys(self) -> set[str]:
        return set(self._store)

    def features(
        self,
        model: torch.nn.Module,
        keys: Sequence[str],
        image_grid_thw: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_index: Sequence[int] = (),
    ) -> dict:
        """`mm_encoder_outputs` for the model's forward, one feature tensor per image of `keys`.
        `pixel_values` holds the patches of the images `pixel_index` (positions in `keys`), the ones
        not cached when the batch was built; the tower runs on those alone, without gradients."""
        core, _ = _vlm_parts(model)
        if not vision_frozen(model):
            raise ValueError("VisionFeatureCache needs a frozen vision tower; lora.vision=true trains it")
        if len(keys) != len(image_grid_thw):
            raise ValueError(f"{len(keys)} keys for {len(image_grid_thw)} images: give one key per image")
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if len(pixel_index):
            with torch.no_grad(), phase("vision_tower"):
                out = core.get_image_features(
                    pixel_values, image_grid_thw[list(pixel_index)], return_dict=True
                )
            # Qwen3-VL: deepstack_features[level][image], e.g. 3 levels of (256, 4096) for an 8B image at
            # 448 px, added to the hidden states of decoder layers 0-2; Qwen2/2.5-VL and Qwen3.5 have none.
            levels = getattr(out, "deepstack_features", None) or []
            for j, i in enumerate(pixel_index):
                fresh[i] = tuple(f.detach() for f in (out.pooler_output[j], *(lv[j] for lv in levels)))
                self._keep(keys[i], fresh[i])
        missing = [k for i, k in enumerate(keys) if i not in fresh and k not in self._store]
        if missing:
            raise KeyError(f"no pixels and no cached features for {len(missing)} image(s), e.g. {missing[0]}")
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        device = image_grid_thw.device
        feats = [
            fresh[i] if i in fresh else tuple(t.to(device) for t in self._store[k])
            for i, k in enumerate(keys)
        ]
        pooled = tuple(f[0] for f in feats)
        if len(feats[0]) == 1:
            return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        deepstack = [tuple(f[level] for f in feats) for level in range(1, len(feats[0]))]
        return {"image": _DeepstackOutput(pooler_output=pooled, deepstack_features=deepstack)}

    def encoder_outputs(
        self,
        model: torch.nn.Module,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        keys: Sequence[str],
    ) -> dict:
        """`features` from a whole batch's pixel_values (every image's patches, in batch order)."""
        sizes = image_grid_thw.prod(-1).tolist()
        chunks = pixel_values.split(sizes)
        todo = [i for i, k in enumerate(keys) if k not in self._store]
        pix = torch.cat([chunks[i] for i in todo]) if todo else None
        return self.features(model, keys, image_grid_thw, pix, todo)

    def _keep(self, key: str, feats: tuple[torch.Tensor, ...]) -> None:
        size = sum(f.numel() * f.element_size() for f in feats)
        if key not in self._store and self._bytes + size <= self.max_bytes:
            self._store[key] = tuple(f.to(self.device) for f in feats) if self.device is not None else feats
            self._bytes += size
