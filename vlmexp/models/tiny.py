"""Tiny random-weight VLMs, one per family, built offline from a config in well under a second.

Each is a real architecture (same module names, processor and chat template as the hub checkpoint)
shrunk to text hidden 64, 2 layers, vision depth 1, so that the whole pipeline (LoRA selection,
trl SFT, scoring, export) runs on a laptop CPU. The tokenizer is a byte-level BPE trained in memory,
so any text (CJK label names included) encodes without unknown tokens.

The newer families carry the hub checkpoints' own chat templates, read from trl's copies
(trl/chat_templates/*.jinja) so that trl recognises them: Qwen3-VL, Qwen3.5 (its "think" template,
as Qwen3.5-4B and larger ship it), Gemma 3 and Gemma 4. Their builders live in `tiny_recent.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

# The four original families, then today's (builders in tiny_recent.py).
FAMILIES = (
    *("qwen2_vl", "qwen2_5_vl", "smolvlm", "llava"),
    *("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "gemma3", "gemma4"),
)

# The hub checkpoints' chat templates, byte for byte: trl recognises the Qwen2-VL and SmolVLM ones by
# string equality and swaps in a training variant with {% generation %} markers for assistant_only_loss
# (trl/chat_templates/qwen2_5_vl.jinja, smolvlm.jinja). Qwen2-VL and Qwen2.5-VL ship the same template.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# HuggingFaceTB/SmolVLM-Instruct.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# llava-hf/llava-1.5-7b-hf: already carries {% generation %} markers, so trl uses it as is.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2-VL's special tokens in the hub order (ids 0.. here; the real ones start at 151643).
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Idefics3Processor looks up every one of these ids (the 36 tile-position tokens included).
SMOLVLM_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Training text for the BPE: chat-template fragments, prompt-like English and CJK, so common words
# get their own tokens; anything else falls back to bytes.
_CORPUS = [
    "You are a helpful assistant.",
    "system user assistant USER: ASSISTANT: User: Assistant:",
    "Classify the image. Answer with one label from the list below.",
    "Which class does this picture show? Answer: label",
    "Labels: cat, dog, bird, fish, car, truck, plane, ship, red, green, blue, yellow",
    "circle square triangle star cross stripes dots noise",
    "The answer is {label}. Reason: the image shows a small object in the centre.",
    "Description: a screenshot of a refund page with a button and some text.",
    "OCR text: Order number 12345, total $67.89, status shipped.",
    "Think step by step, then give the final answer on the last line.",
    "label_a label_b label_c label_d class_0 class_1 class_2 class_3",
    "Final answer: positive negative neutral other unknown",
    "退款页面 订单 支付 物流 客服 投诉 商品 发货 收货 地址",
    "这是一张截图。请选择一个类别。答案：",
    "图片 类别 原因 描述 文本 标签 正确 错误",
    "日本語のテキスト、한국어 텍스트, émoji 🙂, naïve café, 0123456789",
    "punctuation: ()[]{}<>.,;:!?'\"-_/\\|@#%^&*+=~`",
    "\n\n\t  indentation and newlines\n",
]


def _tokenizer(specials: list[str], template: str, **roles: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, like the real Qwen/SmolVLM/LLaMA-3 ones) trained on `_CORPUS`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **roles)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in roles.values()]})
    return fast


def _text_sizes() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def _qwen(family: str):
    tok = _tokenizer(QWEN_SPECIALS, QWEN2_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        _text_sizes(),
        vocab_size=len(tok),
        # head_dim 16 -> mrope sections must sum to 8
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_vl":
        # the merger maps vision embed_dim -> hidden_size, which must be the text hidden size
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    else:
        vision = dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            fullatt_block_indexes=[0],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    # 56x56..112x112 px: a 112 px image is 8x8 patches of 14 -> 16 image tokens after 2x2 merging
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok,
        chat_template=QWEN2_VL_TEMPLATE,
    )
    return config, processor


def _smolvlm():
    tok = _tokenizer(
        SMOLVLM_SPECIALS,
        SMOLVLM_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(_text_sizes(), model_type="llama", vocab_size=len(tok), **ids)
    # 32 px images in 8 px patches = 16 patches; pixel shuffle by 2 -> 4 image tokens per image
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_id)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=SMOLVLM_TEMPLATE
    )
    return config, processor


def _llava():
    tok = _tokenizer(
        LLAVA_SPECIALS,
        LLAVA_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = LlamaConfig(**_text_sizes(), vocab_size=len(tok), **ids)
    # 32 px, patch 8: 16 patches + CLS; the "default" strategy drops CLS -> 16 image tokens.
    # One vision layer, so read its output (-1) rather than LLaVA's usual -2 (which would be the embeddings).
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return config, processor


def build_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random-weight `family` model + processor into `out_dir`; same seed, same weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family '{family}'; choose one of: {', '.join(FAMILIES)}")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        config, processor = _qwen(family)
    elif family == "smolvlm":
        config, processor = _smolvlm()
    elif family == "llava":
        config, processor = _llava()
    else:
        from vlmexp.models import tiny_recent

        config, processor = tiny_recent.build_config(family)
    # fork_rng: seed the init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tok = processor.tokenizer
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
