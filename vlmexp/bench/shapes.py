"""Real-architecture model shapes with random weights, built offline from transformers config classes.

The bench needs the cost of a real 3B/7B model, not its knowledge: random weights run the same kernels
on the same tensor sizes. The tokenizer and chat template come from `models/tiny.py` (vocab ~600), while
the embedding keeps the real vocabulary size, so the lm_head costs what it costs in the real model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

from vlmexp.models.tiny import build_tiny


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # tiny family whose tokenizer/processor we borrow: qwen2_vl or qwen2_5_vl
    text: dict
    vision: dict
    tie_word_embeddings: bool
    notes: str = ""
    defaults: dict = field(default_factory=dict)  # bench defaults for this shape, e.g. resolution


# Values from the hub checkpoints' config.json (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2-VL-7B-Instruct).
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
SHAPES: dict[str, Shape] = {
    "qwen2.5-vl-3b": Shape(
        name="qwen2.5-vl-3b",
        family="qwen2_5_vl",
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            rope_parameters=_QWEN_ROPE,
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            hidden_act="silu",
        ),
        tie_word_embeddings=True,
        notes="3.75 B parameters",
        defaults={"resolution": 448, "tokens": 570, "batch_size": 8},
    ),
    "qwen2-vl-7b": Shape(
        name="qwen2-vl-7b",
        family="qwen2_vl",
        text=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters=_QWEN_ROPE,
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            num_heads=16,
            mlp_ratio=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
        ),
        tie_word_embeddings=False,
        notes="8.3 B parameters",
        defaults={"resolution": 448, "tokens": 570, "batch_size": 8},
    ),
    # CPU tests: Qwen2.5-VL layout with windowed *and* full vision attention (depth 2), 112 px images.
    "tiny": Shape(
        name="tiny",
        family="qwen2_5_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
        defaults={"resolution": 224, "tokens": 120, "batch_size": 2},
    ),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"unknown bench shape '{name}'; choose one of: {', '.join(SHAPES)}")
    return SHAPES[name]


@lru_cache(maxsize=4)
def _tiny_dir(family: str) -> Path:
    # Borrow the tiny model's tokenizer, chat template and processor classes (built offline, ~0.2 s).
    return build_tiny(family, Path(tempfile.mkdtemp(prefix=f"vlmexp-bench-{family}-")))


def build_config(shape: Shape):
    """The transformers config of `shape`, with the special-token ids of the borrowed tokenizer."""
    tiny_cfg = AutoConfig.from_pretrained(_tiny_dir(shape.family))
    ids = {k: getattr(tiny_cfg, k) for k in ("image_token_id", "video_token_id")}
    ids |= {k: getattr(tiny_cfg, k) for k in ("vision_start_token_id", "vision_end_token_id")}
    tt = tiny_cfg.text_config
    text = dict(
        shape.text,
        bos_token_id=tt.bos_token_id,
        eos_token_id=tt.eos_token_id,
        pad_token_id=tt.pad_token_id,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    cls = Qwen2_5_VLConfig if shape.family == "qwen2_5_vl" else Qwen2VLConfig
    return cls(
        text_config=text,
        vision_config=dict(shape.vision),
        tie_word_embeddings=shape.tie_word_embeddings,
        **ids,
    )


def build_processor(shape: Shape, resolution: int):
    """The family's processor, resizing every image to `resolution` x `resolution` (a multiple of 28)."""
    if resolution % 28:
        raise ValueError(f"resolution={resolution}: Qwen-VL images must be a multiple of 28 px, e.g. 448")
    processor = AutoProcessor.from_pretrained(_tiny_dir(shape.family))
    # {shortest_edge: min_pixels, longest_edge: max_pixels}: a square image of exactly this area stays as is.
    processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": resolution * resolution}
    return processor


def build_model(
    shape: Shape,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    seed: int = 0,
):
    """Random-weight model of `shape`, initialised directly on `device` (a 3B model in a few seconds)."""
    config = build_config(shape)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def count_params(model: torch.nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    return {"total": total, "vision": vision, "language": total - vision}
