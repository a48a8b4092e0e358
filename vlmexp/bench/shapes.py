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
    Gemma3Config,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)

from vlmexp.models.tiny import build_tiny


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # tiny family whose tokenizer/processor we borrow: qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3
    text: dict
    vision: dict
    tie_word_embeddings: bool
    notes: str = ""
    defaults: dict = field(default_factory=dict)  # bench defaults for this shape, e.g. resolution
    # Gemma 3 only: soft tokens per image after average pooling, e.g. 4096 patches -> 256 in the 4B
    mm_tokens_per_image: int | None = None


# Values from the hub checkpoints' config.json (Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2-VL-7B-Instruct).
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
# Gemma 3's two rope layouts (its 4B config): linear-scaled for global layers, plain for sliding ones.
_GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
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
    # Qwen/Qwen3-VL-8B-Instruct's config.json: 8.77 B parameters. Patches of 16 px merged 2x2, so a
    # 448 px image is 28x28 patches -> 196 tokens (Qwen2.5-VL's 14 px patches give 256), plus deepstack
    # features from vision blocks 8, 16, 24 added to decoder layers 0-2.
    "qwen3-vl-8b": Shape(
        name="qwen3-vl-8b",
        family="qwen3_vl",
        text=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
            hidden_act="gelu_pytorch_tanh",
        ),
        tie_word_embeddings=False,
        notes="8.77 B parameters",
        defaults={"resolution": 448, "tokens": 510, "batch_size": 8},
    ),
    # google/gemma-3-4b-it's config.json: 4.30 B parameters; SigLIP-so400m at a fixed 896 px
    # (4096 patches of 14 px, pooled to 256 soft tokens), 5 sliding-window layers (1024) to 1 global.
    # The bench rows run it (train and predict; flops.py counts its sliding layers and pooled tower);
    # tiny-gemma3 below is the same layout for the CPU tests.
    "gemma-3-4b": Shape(
        name="gemma-3-4b",
        family="gemma3",
        text=dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            vocab_size=262208,
            sliding_window=1024,
            max_position_embeddings=131072,
            rope_parameters=_GEMMA3_ROPE,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=896,
            patch_size=14,
            vision_use_head=False,
        ),
        tie_word_embeddings=True,
        notes="4.30 B parameters",
        defaults={"resolution": 896, "tokens": 330, "batch_size": 8},
        mm_tokens_per_image=256,
    ),
    # CPU tests of the Gemma 3 path: one sliding (window 32, shorter than the ~90-token samples) and one
    # global layer, tied embeddings, SigLIP at a fixed 112 px = 8x8 patches of 14 px pooled 2x2 to 16
    # soft tokens.
    "tiny-gemma3": Shape(
        name="tiny-gemma3",
        family="gemma3",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            vocab_size=1024,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=4096,
            rope_parameters=_GEMMA3_ROPE,
        ),
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
            vision_use_head=False,
        ),
        tie_word_embeddings=True,
        defaults={"resolution": 112, "tokens": 90, "batch_size": 2},
        mm_tokens_per_image=16,
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
    # CPU tests of the Qwen3-VL path (deepstack after vision block 0, 16 px patches, 128 px images).
    "tiny-qwen3-vl": Shape(
        name="tiny-qwen3-vl",
        family="qwen3_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=1024,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=False,
        defaults={"resolution": 128, "tokens": 80, "batch_size": 2},
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
    tt = tiny_cfg.text_config
    text = dict(
        shape.text,
        bos_token_id=tt.bos_token_id,
        eos_token_id=tt.eos_token_id,
        pad_token_id=tt.pad_token_id,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    if shape.family == "gemma3":
        ids = {k: getattr(tiny_cfg, k) for k in ("boi_token_index", "eoi_token_index", "image_token_index")}
        return Gemma3Config(
            text_config=text,
            vision_config=dict(shape.vision),
            mm_tokens_per_image=shape.mm_tokens_per_image,
            tie_word_embeddings=shape.tie_word_embeddings,
            **ids,
        )
    ids = {k: getattr(tiny_cfg, k) for k in ("image_token_id", "video_token_id")}
    ids |= {k: getattr(tiny_cfg, k) for k in ("vision_start_token_id", "vision_end_token_id")}
    classes = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}
    return classes[shape.family](
        text_config=text,
        vision_config=dict(shape.vision),
        tie_word_embeddings=shape.tie_word_embeddings,
        **ids,
    )


def build_processor(shape: Shape, resolution: int):
    """The family's processor, resizing every image to `resolution` x `resolution` (Qwen: a multiple of
    one merged patch, 28 px in Qwen2/2.5-VL, 32 px in Qwen3-VL; Gemma 3: its fixed image size only)."""
    if shape.family == "gemma3":
        return _gemma3_processor(shape, resolution)
    processor = AutoProcessor.from_pretrained(_tiny_dir(shape.family))
    step = processor.image_processor.patch_size * processor.image_processor.merge_size
    if resolution % step:
        raise ValueError(
            f"resolution={resolution}: {shape.name} images must be a multiple of {step} px, e.g. {step * 16}"
        )
    # {shortest_edge: min_pixels, longest_edge: max_pixels}: a square image of exactly this area stays as is.
    processor.image_processor.size = {"shortest_edge": step * step, "longest_edge": resolution * resolution}
    return processor


def _gemma3_processor(shape: Shape, resolution: int):
    """The tiny Gemma 3 processor loaded with the shape's sizes: every image resized to the tower's
    image_size (896 px in the 4B) and expanded to mm_tokens_per_image soft tokens (256) between
    <start_of_image> and <end_of_image>; Gemma3Processor builds that sequence from image_seq_length."""
    size = shape.vision["image_size"]
    if resolution != size:
        raise ValueError(
            f"resolution={resolution}: {shape.name} resizes every image to {size} px (its position "
            f"embeddings cover {size // shape.vision['patch_size']}^2 patches); pass resolution={size}"
        )
    return AutoProcessor.from_pretrained(
        _tiny_dir(shape.family),
        size={"height": size, "width": size},
        image_seq_length=shape.mm_tokens_per_image,
    )


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
    vision = sum(
        p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}" or ".vision_tower." in f".{n}"
    )
    return {"total": total, "vision": vision, "language": total - vision}
