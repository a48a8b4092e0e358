"""Vision features of a frozen tower, once per image per run (speed.vision_cache).

A frozen vision tower (language-only LoRA) gives the same features for an image every epoch and fold:
a 5-fold run with E epochs otherwise runs the tower 4E+1 times per image. `VisionFeatureCache` keeps
them by image key (`encode.image_key`) and hands them to the language model through
`mm_encoder_outputs` instead of `pixel_values`. 448 px in Qwen2.5-VL-3B: 256 x 2048 bf16 = 1 MiB per
image. Gemma 3 (transformers 5.24) takes `mm_encoder_outputs` too: its forward scatters the features
into the image token positions exactly as it does the tower's own output, and its bidirectional image
mask comes from `token_type_ids`, not from pixel_values (tests/test_vision_cache_gemma.py does the
same merge by hand: equal logits). Its SigLIP tower is 5.5 TFLOP per 896 px image
against 2.1 TFLOP for a 330-token Gemma-3-4B language forward (bench/flops.py).
`engine/run_caches.py` (`RunCaches.vision_for`) decides per model whether the cache serves it
(`vision_cache_unsupported`, `vision_frozen`); the trainer's `compute_loss` and `predict` use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmexp.engine.vision_inputs import tower_inputs
from vlmexp.models.parts import unwrap, vlm_parts
from vlmexp.timing import phase


def vision_cache_unsupported(model: torch.nn.Module) -> str | None:
    """Why the feature cache cannot serve `model`, or None when it can: the cache hands the language
    model per-image features through `mm_encoder_outputs`, which the Qwen-VL family's forward takes
    (Qwen2/2.5/3-VL, Qwen3.5), and Gemma 3's (prediction and training, tests/test_vision_cache_gemma.py).
    Gemma 4, LLaVA and SmolVLM run their tower inside forward on pixel_values here, so nothing computed
    earlier stands in for it."""
    core = getattr(unwrap(model), "model", None)
    if getattr(core, "visual", None) is not None and hasattr(core, "get_image_features"):
        return None
    if is_gemma3(model):
        return None
    return (
        f"{type(unwrap(model)).__name__} takes no precomputed image features (its forward runs the vision "
        "tower on pixel_values itself); the vision feature cache is off for it"
    )


def is_gemma3(model: torch.nn.Module) -> bool:
    """Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower + projector taking pixel_values only,
    one (mm_tokens_per_image, hidden) feature block per image crop."""
    base = unwrap(model)
    core = getattr(base, "model", None)
    return (
        getattr(base.config, "model_type", None) == "gemma3"
        and getattr(core, "vision_tower", None) is not None
        and getattr(core, "multi_modal_projector", None) is not None
    )


def _tower_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose weights make an image's features: Qwen-VL's `.visual` (tower + merger), Gemma
    3's `.vision_tower` + `.multi_modal_projector`; [] for any other model."""
    core = getattr(unwrap(model), "model", None)
    if getattr(core, "visual", None) is not None:
        return [core.visual]
    if is_gemma3(model):
        return [core.vision_tower, core.multi_modal_projector]
    return []


def vision_frozen(model: torch.nn.Module) -> bool:
    """True for a Qwen-VL-style model (`.model.visual`, features by `get_image_features`) or Gemma 3
    whose vision tower and merger/projector train no weight (language-only LoRA), so an image's
    features never change."""
    parts = _tower_modules(model)
    return bool(parts) and not any(p.requires_grad for m in parts for p in m.parameters())


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

    @property
    def bytes_left(self) -> int:
        """Room left under `max_gib`, e.g. 0 once 16 GiB are kept: features computed now are not kept."""
        return self.max_bytes - self._bytes

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
        core, _ = vlm_parts(model)
        if not vision_frozen(model):
            raise ValueError("VisionFeatureCache needs a frozen vision tower; lora.vision=true trains it")
        if len(keys) != len(image_grid_thw):
            raise ValueError(f"{len(keys)} keys for {len(image_grid_thw)} images: give one key per image")
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if len(pixel_index):
            grid = image_grid_thw[list(pixel_index)]
            with torch.no_grad(), phase("vision_tower"):
                # The tower's grid-derived inputs from the grid on the CPU (the pre-pass's grid is there
                # already; a batch's costs one wait) instead of ~20 waits inside the tower (vision_inputs).
                host = grid.cpu()
                visual = core.visual
                pre = tower_inputs(visual, host, next(visual.parameters()).device)
                out = core.get_image_features(pixel_values, host if pre else grid, return_dict=True, **pre)
            # Qwen3-VL: deepstack_features[level][image], e.g. 3 levels of (256, 4096) for an 8B image at
            # 448 px, added to the hidden states of decoder layers 0-2; Qwen2/2.5-VL and Qwen3.5 have none.
            levels = getattr(out, "deepstack_features", None) or []
            for j, i in enumerate(pixel_index):
                fresh[i] = tuple(f.detach() for f in (out.pooler_output[j], *(lv[j] for lv in levels)))
                self._keep(keys[i], fresh[i])
        feats = self._gather(keys, fresh, core.get_input_embeddings().weight.device)
        pooled = tuple(f[0] for f in feats)
        if len(feats[0]) == 1:
            return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
        deepstack = [tuple(f[level] for f in feats) for level in range(1, len(feats[0]))]
        return {"image": _DeepstackOutput(pooler_output=pooled, deepstack_features=deepstack)}

    def pixel_features(
        self,
        model: torch.nn.Module,
        keys: Sequence[str],
        pixel_values: torch.Tensor | None,
        pixel_index: Sequence[int] | None = None,
    ) -> dict | None:
        """`mm_encoder_outputs` for Gemma 3's forward, one (mm_tokens_per_image, hidden) block per image
        of `keys`. `pixel_values` holds one crop per image of `pixel_index` (positions in `keys`; None:
        every image, e.g. a processor batch); the tower runs, without gradients, on those not cached yet
        only. None when a batch of every image has not one crop per image (pan-and-scan): it then runs on
        pixel_values as before."""
        core, _ = vlm_parts(model)
        if not vision_frozen(model):
            raise ValueError("VisionFeatureCache needs a frozen vision tower; lora.vision=true trains it")
        if pixel_index is None:
            if pixel_values is None or pixel_values.shape[0] != len(keys):
                return None
            pixel_index = range(len(keys))
        elif len(pixel_index) != (0 if pixel_values is None else pixel_values.shape[0]):
            raise ValueError(f"pixels of {len(pixel_index)} images expected, got {len(pixel_values)} crops")
        # An image twice in one batch (a duplicate row; prediction's length order puts equal prompts
        # side by side) goes through the tower once; its second place reads the first's features.
        first: dict[str, int] = {}
        todo = []
        for j, i in enumerate(pixel_index):
            if keys[i] not in self._store and keys[i] not in first:
                first[keys[i]] = i
                todo.append((j, i))
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if todo:
            with torch.no_grad(), phase("vision_tower"):
                out = core.get_image_features(pixel_values[[j for j, _ in todo]], return_dict=True)
            for (_, i), feat in zip(todo, out.pooler_output, strict=True):
                fresh[i] = (feat.detach(),)
                self._keep(keys[i], fresh[i])
        for i, k in enumerate(keys):  # a duplicate of an image the budget did not let the cache keep
            if i not in fresh and k in first and k not in self._store:
                fresh[i] = fresh[first[k]]
        feats = self._gather(keys, fresh, core.get_input_embeddings().weight.device)
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.stack([f[0] for f in feats]))}

    def fill(self, model: torch.nn.Module, inputs: dict, keys: Sequence[str], index, encoder=None) -> dict:
        """A batch's inputs with cached features standing in for its pixels: the one step training
        (`trainer._SFTTrainer.compute_loss`) and prediction (`predict._context`) share. `keys`: the batch's
        image keys; `index`: positions in `keys` whose pixels the batch holds (None: all). Qwen-VL batches
        carry `image_grid_thw` (`features`), Gemma 3's do not (`pixel_features`; pan-and-scan crops keep
        their pixels). `encoder`: the run's Encoder, whose kept pixels of cached images are let go."""
        pixels = inputs.pop("pixel_values", None)
        if "image_grid_thw" in inputs:
            mm = self.features(model, keys, inputs["image_grid_thw"], pixels, index or ())
        else:
            mm = self.pixel_features(model, keys, pixels, index)
            if mm is None:  # pan-and-scan crops: the tower runs on them inside forward
                inputs["pixel_values"] = pixels
                return inputs
        inputs["mm_encoder_outputs"] = mm
        if encoder is not None:
            encoder.forget_pixels(k for k in keys if k in self)
        return inputs

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

    def _gather(
        self, keys: Sequence[str], fresh: dict[int, tuple[torch.Tensor, ...]], device: torch.device
    ) -> list[tuple[torch.Tensor, ...]]:
        """Each image's features in `keys` order: computed now (`fresh`, by position) or cached (moved to
        `device`); counts the hits and misses, and fails loud for an image that has neither."""
        missing = [k for i, k in enumerate(keys) if i not in fresh and k not in self._store]
        if missing:
            raise KeyError(f"no pixels and no cached features for {len(missing)} image(s), e.g. {missing[0]}")
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        out = []
        for i, k in enumerate(keys):
            out.append(fresh[i] if i in fresh else tuple(t.to(device) for t in self._store[k]))
        return out

    def _keep(self, key: str, feats: tuple[torch.Tensor, ...]) -> None:
        size = sum(f.numel() * f.element_size() for f in feats)
        if key not in self._store and self._bytes + size <= self.max_bytes:
            self._store[key] = tuple(f.to(self.device) for f in feats) if self.device is not None else feats
            self._bytes += size
