"""Vision-tower levers for new images, each equal in output to the plain tower.

The tower's first pass over an image (fold 0's training, validation, the test set's first
prediction) is what the feature cache cannot save: on an H200 new images were predicted at 43
images/s against 113 for cached ones (Qwen2.5-VL-3B shape, docs/performance.md). Three levers:

- `patch_vision_attention`: Qwen-VL vision towers under sdpa loop over every attention window in
  Python (8 images at 448 px = 128 windows x 28 window layers = 3584 tiny kernel calls a forward);
  windows of equal length go through one batched sdpa call instead (flash-attention already packs).
- `pad_vision_mlp`: Qwen2.5-VL's vision MLP has intermediate size 3420, for which cuBLAS picks
  Ampere-generation kernels: 224-254 TFLOP/s against 758-784 at 3456, the next multiple of 128
  (/work/shared/ENVIRONMENT.md, December). Zero rows appended to gate/up (weights and biases) give
  act(0) * 0 = 0 in the new channels, and zero columns of down add nothing: the output is unchanged
  (bit-identical in fp32 on the H200; tests/test_vision_speed.py checks it on the CPU).
  Only for a tower without adapters or trained weights: LoRA on the vision MLP would get adapters
  shaped for 3456 that do not load on the real model, training would move the zero rows, and a fully
  fine-tuned tower would be saved padded.
- `compile_vision_blocks`: each vision block through torch.compile with static shapes (278 images/s
  for the tower alone against 125 eager; dynamic shapes failed in inductor). A static shape per
  image count would recompile for every batch, so a batch of images of one size is padded with
  copies of its last image up to a count in `IMAGE_BUCKETS` (3 -> 4) and the copies' outputs dropped:
  each image attends only within itself, so the real images' features are unchanged. Batches of
  mixed image sizes (a new patch count each time) run the eager blocks instead of recompiling.

- `patch_embed_gemm` (`speed.vision_patch_gemm`): the patch embedding is a Conv3d whose kernel equals
  its stride and its input (2 x 14 x 14 pixels x 3 channels per patch): one matmul of the flattened
  patches by the flattened kernel. cuDNN ran it as an implicit-GEMM convolution, 4.1 ms for 32 images
  of 448 px on the H200 (run AP's profile), about 4% of a 103 ms tower call (run AR); the same matmul
  through cuBLAS is a fraction of that. The same products and sums in another order: equal up to rounding.

`prepare_tower(model, cfg)` applies the MLP padding and the compile as `speed.*` switches them on;
`engine/speed.py` (`prepare`, called by engine/trainer.py `build_trainer` and engine/predict.py
`predict`) applies it and the window attention on CUDA, once per base model.
"""

from __future__ import annotations

import logging
import sys
import types

import torch
import torch.nn.functional as F

from vlmexp.engine.compile import allow_recompiles
from vlmexp.engine.vision_inputs import TOWER_KEYS, tower_inputs, window_lengths
from vlmexp.models.parts import unwrap

log = logging.getLogger(__name__)

PAD_MULTIPLE = 128  # cuBLAS's fast H100/H200 kernels want K and N in multiples of 128
IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # images per tower call when compiled
RECOMPILE_LIMIT = 64  # dynamo's default 8 is hit by 2 block kinds (window/full) x a few buckets


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Qwen-VL vision tower (`.model.visual`), or None for other families."""
    return getattr(getattr(unwrap(model), "model", None), "visual", None)


def tower_is_plain(model: torch.nn.Module) -> tuple[bool, str]:
    """(True, "") when the tower has no adapter and trains no weight; else (False, why)."""
    visual = vision_tower(model)
    if visual is None:
        return False, "no Qwen-VL vision tower (.model.visual)"
    if any(hasattr(m, "lora_A") or hasattr(m, "modules_to_save") for m in visual.modules()):
        return False, "the vision tower carries adapters (lora.vision=true or lora.modules_to_save)"
    if any(p.requires_grad for p in visual.parameters()):
        return False, "the vision tower trains (finetune=full)"
    return True, ""


_PATCHABLE = {"Qwen2_5_VLVisionAttention", "VisionAttention"}  # Qwen2.5-VL, Qwen2-VL


def _batched_window_forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    # Same computation as the module's own non-flash branch, with windows of equal length batched:
    # (1, heads, S, d) -> (n_windows, heads, L, d). 448 px: 16 windows of 64 patches per image.
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._vlmexp_rope(q, k, cos, sin)  # (S, heads, d)
    lengths = window_lengths(cu_seqlens)
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


def _mlps(visual: torch.nn.Module):
    """(mlp, [row-wise linears], column-wise linear) of each block: gate/up/down or fc1/fc2. Plain
    float Linear layers only: a quantised one (bitsandbytes' Linear4bit under model.quant=4bit, a
    subclass) or an adapter-wrapped one is left alone."""
    for m in visual.modules():
        lin = {
            n: c
            for n, c in m.named_children()
            if type(c) is torch.nn.Linear and c.weight.dtype.is_floating_point
        }
        if {"gate_proj", "up_proj", "down_proj"} <= lin.keys():
            yield m, [lin["gate_proj"], lin["up_proj"]], lin["down_proj"]
        elif {"fc1", "fc2"} <= lin.keys():
            yield m, [lin["fc1"]], lin["fc2"]


def pad_vision_mlp(model: torch.nn.Module, multiple: int = PAD_MULTIPLE) -> int:
    """Zero-pad every vision MLP's intermediate size up to `multiple` (3420 -> 3456). Returns how many
    MLPs were padded; 0 when already padded, already a multiple, or skipped (logged with the reason)."""
    plain, why = tower_is_plain(model)
    if not plain:
        log.info("vision MLP padding skipped: %s", why)
        return 0
    n = 0
    for mlp, rows, cols in _mlps(vision_tower(model)):
        inter = cols.in_features
        width = -(-inter // multiple) * multiple
        if width == inter:
            continue
        extra = width - inter
        with torch.no_grad():
            for lin in rows:  # output rows: zero weights and zero biases
                w = lin.weight
                lin.weight = torch.nn.Parameter(torch.cat([w, w.new_zeros(extra, w.shape[1])]), False)
                if lin.bias is not None:
                    lin.bias = torch.nn.Parameter(torch.cat([lin.bias, lin.bias.new_zeros(extra)]), False)
                lin.out_features = width
            w = cols.weight  # input columns: zero weights
            cols.weight = torch.nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], extra)], dim=1), False)
            cols.in_features = width
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
        n += 1
    return n


def patch_embed_gemm(model: torch.nn.Module) -> int:
    """Give the tower's patch-embedding Conv3d (kernel = stride, no padding, dilation or groups) a
    forward that is one matmul; 1 if patched, 0 otherwise (no such conv, or patched already)."""
    visual = vision_tower(model)
    conv = getattr(getattr(visual, "patch_embed", None), "proj", None)
    if not isinstance(conv, torch.nn.Conv3d) or "forward" in conv.__dict__:
        return 0
    plain_stride = tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
    if not plain_stride or any(conv.padding) or any(d != 1 for d in conv.dilation):
        return 0
    conv.forward = types.MethodType(_patch_matmul, conv)
    return 1


def _patch_matmul(self: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    # x: (patches, channels, t, h, w), each patch exactly one kernel window -> (patches, out, 1, 1, 1)
    if tuple(x.shape[2:]) != tuple(self.kernel_size):  # another input layout: the convolution itself
        return torch.nn.Conv3d.forward(self, x)
    out = F.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
    return out.view(x.shape[0], self.out_channels, 1, 1, 1)


def image_bucket(n: int) -> int:
    """The smallest count in IMAGE_BUCKETS holding `n` images (n itself past the last)."""
    return next((b for b in IMAGE_BUCKETS if b >= n), n)


def bucket_images(model: torch.nn.Module, state: dict | None = None) -> bool:
    """Wrap the tower's forward: a batch of equal-size images is padded with copies of its last image
    to `image_bucket(n)` images, and only the real images' outputs are returned. `state["static"]`
    tells the compiled blocks whether this call's shapes are bucketed. Returns False if wrapped already."""
    visual = vision_tower(model)
    if visual is None or "forward" in visual.__dict__:
        return False
    original = visual.forward
    state = state if state is not None else {}
    merge = getattr(visual, "spatial_merge_size", 2) ** 2

    def forward(hidden_states, grid_thw, **kwargs):
        n = grid_thw.shape[0]
        uniform = bool((grid_thw == grid_thw[:1]).all())
        state["static"] = uniform
        if not uniform or image_bucket(n) == n:
            return original(hidden_states, grid_thw, **kwargs)
        extra = image_bucket(n) - n
        per = hidden_states.shape[0] // n
        grid = torch.cat([grid_thw, grid_thw[-1:].repeat(extra, 1)])
        if any(k in kwargs for k in TOWER_KEYS):
            # Inputs precomputed for the n real images (vision_inputs): again for the padded count.
            kwargs = {k: v for k, v in kwargs.items() if k not in TOWER_KEYS}
            kwargs.update(tower_inputs(visual, grid.cpu(), hidden_states.device))
        out = original(torch.cat([hidden_states, hidden_states[-per:].repeat(extra, 1)]), grid, **kwargs)
        # Real images come first in both outputs (the window order is built image by image).
        out.pooler_output = out.pooler_output[: hidden_states.shape[0] // merge]
        out.last_hidden_state = out.last_hidden_state[: hidden_states.shape[0]]
        return out

    visual.forward = forward
    return True


def compile_vision_blocks(model: torch.nn.Module) -> int:
    """torch.compile(dynamic=False) each vision block, used for bucketed calls of equal-size images;
    other calls run the blocks eagerly. Returns the number of blocks compiled now."""
    visual = vision_tower(model)
    blocks = getattr(visual, "blocks", None)
    if blocks is None or "forward" in blocks[0].__dict__:  # compiled already (the bench undoes it)
        return 0
    allow_recompiles(RECOMPILE_LIMIT)
    state = {"static": False}
    bucket_images(model, state)
    for blk in blocks:
        eager = blk.forward
        compiled = torch.compile(eager, dynamic=False)

        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            return (_compiled if state["static"] else _eager)(*args, **kwargs)

        blk.forward = forward
    return len(blocks)


def prepare_tower(model: torch.nn.Module, cfg) -> dict:
    """Apply the tower levers `cfg.speed` switches on; {lever: count} for the log. Nothing when the run
    trains the tower (lora.vision=true, finetune=full), even on a model that has no adapter yet: a base
    model shared by the folds is padded for good, and the next fold's vision adapters would be shaped
    for the padded size."""
    if cfg.lora.vision or cfg.model.finetune == "full":
        return {}
    speed = cfg.speed
    done = {}
    if speed.vision_pad:
        done["vision_pad"] = pad_vision_mlp(model)
    if speed.vision_patch_gemm:
        done["vision_patch_gemm"] = patch_embed_gemm(model)
    if speed.vision_compile:
        plain, why = tower_is_plain(model)
        if plain:
            done["vision_compile"] = compile_vision_blocks(model)
        else:
            log.info("vision blocks not compiled: %s", why)
    return done
