"""Tiny random-weight builders for today's families: Qwen3-VL (dense and MoE), Qwen3.5, Gemma 3, Gemma 4.

Same recipe as `tiny.py` (text hidden 64, 2 layers, a one- or two-block vision tower, byte-level BPE),
with each family's real module layout, processor and chat template. The templates are trl's copies
of the hub ones, byte for byte, so trl recognises them exactly as it recognises the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma4Config,
    Gemma4ImageProcessor,
    Gemma4Processor,
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlmexp.models.tiny import QWEN_SPECIALS, _text_sizes, _tokenizer

RECENT_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma3", "gemma4")


def trl_template(name: str) -> str:
    """A hub chat template as trl stores it, e.g. "qwen3_vl" -> trl/chat_templates/qwen3_vl.jinja."""
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    if not path.exists():
        raise FileNotFoundError(f"{path}: trl {trl.__version__} does not ship this chat template")
    return path.read_text(encoding="utf-8")


def _fast(base: PreTrainedTokenizerFast, template: str, extra: dict[str, str], **roles: str):
    """`base`'s vocabulary as a tokenizer whose named special tokens are attributes, e.g.
    `tok.boi_token == "<start_of_image>"`: the Gemma processors read them off the tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=base._tokenizer, chat_template=template, extra_special_tokens=extra, **roles
    )


# -- Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 -----------------------------------------------------------------
def _qwen3(family: str):
    template = trl_template("qwen3_5_think" if family == "qwen3_5" else "qwen3_vl")
    # <think>/</think> are ordinary added tokens in the hub tokenizers (decoded, not skipped)
    tok = _tokenizer(QWEN_SPECIALS, template, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["<think>", "</think>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        _text_sizes(),
        head_dim=16,
        vocab_size=len(tok),
        # head_dim 16 -> mrope sections sum to 8; Qwen3-VL interleaves them (T,H,W,T,H,W,...)
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    # Two blocks, deepstack taken after block 0: its features go into the first decoder layers as in
    # the real 8B (blocks 8, 16, 24 of 27 feed decoder layers 0, 1, 2).
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        out_hidden_size=64,
        patch_size=16,
        num_position_embeddings=16,
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen3_vl":
        vision |= {"deepstack_visual_indexes": [0]}
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    elif family == "qwen3_vl_moe":
        # Experts are fused parameters (experts.gate_up_proj), not Linear modules: see lora.py
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        vision |= {"deepstack_visual_indexes": [0]}
        config = Qwen3VLMoeConfig(text_config=text | moe, vision_config=vision, **tokens)
    else:
        # Qwen3.5: gated-delta-net (linear attention) layers with a full-attention layer every 4th;
        # here one of each. Its tower has no deepstack.
        linear = dict(
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
        config = Qwen3_5Config(text_config=text | linear, vision_config=vision, **tokens)
    # Patches of 16 px, merged 2x2: 64x64..128x128 px, so a 128 px image is 8x8 patches -> 16 tokens
    pixels = {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, "patch_size": 16}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen3VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=template,
    )
    return config, processor


_GEMMA_ROLES = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


# -- Gemma 3 -------------------------------------------------------------------------------------------
GEMMA3_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]


def _gemma3():
    template = trl_template("gemma3")
    base = _tokenizer(GEMMA3_SPECIALS, template, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = _fast(base, template, extra | {"image_token": "<image_soft_token>"}, **_GEMMA_ROLES)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # one sliding and one global layer, as the real 5:1 pattern has both
    text = dict(
        _text_sizes(),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size=len(tok),
        **ids,
    )
    # SigLIP without its pooling head (vision_use_head=False, as in the real checkpoints); 32 px in
    # 8 px patches = 16 patches, average-pooled to mm_tokens_per_image=4 soft tokens
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_length=4, chat_template=template
    )
    return config, processor


# -- Gemma 4 -------------------------------------------------------------------------------------------
GEMMA4_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
]


def _gemma4():
    from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4VideoProcessor

    template = trl_template("gemma4_v5")  # google/gemma-4-E2B-it's current revision
    base = _tokenizer(GEMMA4_SPECIALS, template, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    extra = {
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "image_token": "<|image|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
        "audio_token": "<|audio|>",
    }
    tok = _fast(base, template, extra, **_GEMMA_ROLES)
    c = tok.convert_tokens_to_ids
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(
        _text_sizes(),
        head_dim=16,
        global_head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size=len(tok),
        vocab_size_per_layer_input=len(tok),
        hidden_size_per_layer_input=8,
        **ids,
    )
    # 4 px patches pooled 3x3: the processor's smallest budget, 70 soft tokens, is 630 patches
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        patch_size=4,
        pooling_kernel_size=3,
        position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=c("<|image>"),
        eoi_token_id=c("<image|>"),
        image_token_id=c("<|image|>"),
        video_token_id=c("<|video|>"),
        boa_token_id=c("<|audio>"),
        eoa_token_index=c("<audio|>"),
        audio_token_id=c("<|audio|>"),
    )
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=3),
        image_seq_length=70,
        chat_template=template,
    )
    return config, processor


def build_config(family: str):
    """(config, processor) of a tiny `family` in RECENT_FAMILIES."""
    if family.startswith("qwen3"):
        return _qwen3(family)
    return _gemma3() if family == "gemma3" else _gemma4()
