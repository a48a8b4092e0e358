"""A Qwen-VL vision tower's grid-derived inputs, computed on the host and handed to it precomputed.

Before its first block, transformers' Qwen-VL towers derive from `grid_thw` the rotary position ids,
the per-image sequence boundaries (`cu_seqlens`), Qwen2.5-VL's attention windows (`window_index`,
`cu_window_seqlens`) and Qwen3-VL's position-embedding interpolation (`interp_indices/weights`). On
a GPU grid each `.tolist()`, `nonzero` or CPU index on a GPU tensor waits for the GPU to drain: about
20 host syncs a tower call in run AL's profile (docs/performance.md, runs AL-AO), each one leaving the
GPU idle while the host then builds the next tensors. transformers 5.24's `vision_utils` helpers pop a
precomputed value from the forward's kwargs instead of computing it (`get_image_features` passes
unknown keys on to the tower), so the same helpers run here on the batch's CPU grid (integer
functions of it, equal to what the tower would compute), and the results reach the GPU by
non-blocking copies from pinned memory.

Only the helpers the tower's forward calls are precomputed: a value it does not pop would travel on
to its blocks as a stray keyword. `get_image_features`' own split sizes come from the CPU grid too.
Qwen3-VL's interpolation weights are float32 arithmetic, on the CPU here instead of the GPU: equal to
the last bit on CPU-only runs, within float32 rounding on a GPU (the values are cast to bf16 after).
"""

from __future__ import annotations

import inspect
import re
from functools import cache

import torch

from vlmexp.engine.transfer import to_device

try:
    from transformers import vision_utils
    from transformers.utils.generic import get_max_seqlen, is_flash_attention_requested
except ImportError:  # a transformers before the helpers (5.24 has them): towers compute their own
    vision_utils = None

# The keys a tower's forward pops (transformers 5.24 `vision_utils`), e.g. "cu_seqlens".
TOWER_KEYS = (
    "position_ids",
    "cu_seqlens",
    "max_seqlen",
    "window_index",
    "cu_window_seqlens",
    "max_window_seqlen",
    "interp_indices",
    "interp_weights",
)


@cache
def _helpers(tower_class: type) -> frozenset[str]:
    """The `vision_utils` helpers a tower class's forward calls, e.g. {"get_vision_position_ids",
    "get_vision_attention_seqlens", "get_vision_window_index"} for Qwen2.5-VL; empty when its source
    cannot be read or it predates the helpers (then nothing is precomputed and it computes its own)."""
    if vision_utils is None:
        return frozenset()
    try:
        source = inspect.getsource(tower_class.forward)
    except (OSError, TypeError):
        return frozenset()
    if re.search(r"(merge|include)_temporal\s*=\s*True", source):
        return frozenset()  # clip-level variants (e.g. kimi_k25) whose calls differ from the defaults here
    names = set(re.findall(r"\b(get_vision_\w+)\(", source))
    # Only helpers that take precomputed values: one that cannot pop them would leave them as strays.
    return frozenset(
        n for n in names if "kwargs" in inspect.signature(getattr(vision_utils, n, lambda: None)).parameters
    )


def tower_inputs(visual: torch.nn.Module, grid: torch.Tensor, device: torch.device | str) -> dict:
    """{key: value} to pass as `**kwargs` to `visual`'s forward or `get_image_features` (which hands on
    keys it does not know), computed from `grid`, the images' (t, h, w) rows on the CPU, e.g.
    [[1, 32, 32]] * 8 for eight 448 px images. {} for a tower whose forward calls none of the helpers."""
    uses = _helpers(type(visual))
    if not uses:
        return {}
    if grid.device.type != "cpu":
        raise ValueError("tower_inputs needs the grid on the CPU: its point is that the host never waits")
    config, merge = visual.config, visual.spatial_merge_size
    flash = is_flash_attention_requested(config)
    out: dict = {}
    if "get_vision_position_ids" in uses:
        out["position_ids"] = vision_utils.get_vision_position_ids(grid, merge)
    if "get_vision_attention_seqlens" in uses or "get_vision_cu_seqlens" in uses:
        cu = vision_utils.get_vision_cu_seqlens(grid)
        out["cu_seqlens"] = cu
        if flash:
            out["max_seqlen"] = get_max_seqlen(cu, config)
    if "get_vision_window_index" in uses:
        index, cu_window = vision_utils.get_vision_window_index(
            grid, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size
        )
        out["window_index"], out["cu_window_seqlens"] = index, cu_window
        if flash:
            out["max_window_seqlen"] = get_max_seqlen(cu_window, config)
    if "get_vision_interpolation_indices_and_weights" in uses:
        interp = vision_utils.get_vision_interpolation_indices_and_weights
        out["interp_indices"], out["interp_weights"] = interp(
            grid,
            num_grid_per_side=visual.num_grid_per_side,
            mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=config.spatial_merge_size,
        )
    on_device = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    # The batched window attention (vision_speed) needs each window's length as Python ints: known
    # here without reading the GPU copy back.
    for key in ("cu_seqlens", "cu_window_seqlens"):
        if key in out:
            remember_lengths(on_device[key], (out[key][1:] - out[key][:-1]).tolist())
    return on_device


_LENGTHS: dict[int, tuple[torch.Tensor, list[int]]] = {}  # id(cu_seqlens) -> (it, its window lengths)


def remember_lengths(cu_seqlens: torch.Tensor, lengths: list[int]) -> None:
    """Keep `lengths` for `cu_seqlens`, held by the tensor itself, so an id reused by a new tensor
    never hits; the last 4 are kept (2 a forward: windows and full attention)."""
    while len(_LENGTHS) >= 4:
        _LENGTHS.pop(next(iter(_LENGTHS)))
    _LENGTHS[id(cu_seqlens)] = (cu_seqlens, lengths)


@torch.compiler.disable  # a compiled block (speed.vision_compile) would guard on the tensor's id: a
# recompile every call (run AP's compiled tower row: 28 images/s against 187 eager); here it is a graph
# break, and the lengths come back as ints whose values the rest of the block is specialised on.
def window_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """The attention windows' lengths, e.g. [64, 64, ..., 48]: known from `tower_inputs`, else read
    from the GPU once per tower forward.

    Every window block of one forward gets the same `cu_seqlens` tensor, and the full-attention blocks
    (7, 15, 23, 31 of 32 on Qwen2.5-VL) another. Each read waits for the GPU to finish the blocks
    queued before it, so a read in every block kept the CPU idle for the whole forward instead of
    preparing the next images' pixels (vision_prepass overlaps the two)."""
    hit = _LENGTHS.get(id(cu_seqlens))
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    remember_lengths(cu_seqlens, lengths)
    return lengths
