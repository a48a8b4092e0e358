"""Load a VLM and its processor from a hub id, a local folder or `tiny:<family>`.

Tiny models go through exactly the same loading code as real ones: `resolve_model_path` only turns
`tiny:qwen2_vl` into a folder (built once into `model.cache_dir`), after which everything is
`AutoModelForImageTextToText` / `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, ProcessorMixin

from vlmexp.config import Config, ModelConfig
from vlmexp.models import tiny

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
_STAMP = "vlmexp_tiny.json"


def _tiny_stamp(family: str) -> dict:
    # A cached tiny model is reused only if built by the same tiny.py under the same transformers:
    # a folder saved by one transformers version may not load in another.
    sources = [Path(tiny.__file__), Path(tiny.__file__).with_name("tiny_recent.py")]
    source = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return {"family": family, "tiny_py": source, "transformers": transformers.__version__}


def _read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def resolve_model_path(model_cfg: ModelConfig) -> str:
    """`tiny:<family>` -> absolute path of the built tiny model; a hub id or local path unchanged."""
    name = model_cfg.name
    if not name.startswith(TINY_PREFIX):
        return name
    family = name[len(TINY_PREFIX) :]
    if family not in tiny.FAMILIES:
        raise ValueError(
            f"model.name={name}: unknown tiny family '{family}'; "
            f"choose one of: {', '.join(TINY_PREFIX + f for f in tiny.FAMILIES)}"
        )
    cache = Path(model_cfg.cache_dir).expanduser().resolve()
    final = cache / family
    stamp = _tiny_stamp(family)
    if _read_stamp(final) == stamp:
        return str(final)
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder, then rename: a crash leaves only a stray temp folder and a
    # concurrent run either sees no folder or a complete one, never a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=cache))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        tiny.build_tiny(family, tmp)
        (tmp / _STAMP).write_text(json.dumps(stamp))
        if _read_stamp(final) == stamp:  # a concurrent run finished the same build first
            return str(final)
        if final.exists():  # stale build (older tiny.py or transformers): move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{family}-old-", dir=cache))
            os.replace(final, old / family)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_stamp(final) != stamp:  # not a concurrent build of the same thing: a real problem
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s into %s", name, final)
    return str(final)


def load_processor(cfg: Config) -> ProcessorMixin:
    """The model's processor with `cfg.image` applied; `processor.tokenizer` is its tokenizer."""
    path = resolve_model_path(cfg.model)
    processor = AutoProcessor.from_pretrained(path)
    if not isinstance(processor, ProcessorMixin):
        raise RuntimeError(
            f"AutoProcessor.from_pretrained({path!r}) returned a bare {type(processor).__name__}, not a "
            "processor. transformers does this silently when torchvision is missing (Qwen2-VL, SmolVLM "
            "need its video processor): pip install torchvision"
        )
    _apply_image_cfg(processor, cfg)
    return processor


def _apply_image_cfg(processor: ProcessorMixin, cfg: Config) -> None:
    image_cfg = cfg.image
    ip = getattr(processor, "image_processor", None)
    size = dict(getattr(ip, "size", None) or {})
    kind = type(ip).__name__
    # Qwen-style processors (Qwen2-VL, 2.5-VL, 3-VL) keep the pixel budget in size:
    # {"shortest_edge": min_pixels, "longest_edge": max_pixels}, e.g. {3136, 1003520}.
    qwen_style = hasattr(ip, "merge_size") and {"shortest_edge", "longest_edge"} <= size.keys()
    if image_cfg.min_pixels or image_cfg.max_pixels:
        if not qwen_style:
            raise ValueError(
                f"image.min_pixels/max_pixels only apply to Qwen-VL style processors; {kind} resizes "
                "differently. Remove them, or use image.longest_side / image.resize."
            )
        if image_cfg.min_pixels:
            size["shortest_edge"] = image_cfg.min_pixels
        if image_cfg.max_pixels:
            size["longest_edge"] = image_cfg.max_pixels
        ip.size = size
    # Idefics3/SmolVLM resize so the longest side is size["longest_edge"] px before tiling.
    # Elsewhere the engine downscales the PIL images itself (see image.longest_side).
    if image_cfg.longest_side and set(size) == {"longest_edge"} and not qwen_style:
        ip.size = {"longest_edge": image_cfg.longest_side}


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, else fp16 on a GPU, fp32 on the CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attn(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _model_kwargs(cfg: Config) -> dict:
    dtype = resolve_dtype(cfg.model.dtype)
    kwargs: dict = {"dtype": dtype, "attn_implementation": resolve_attn(cfg.model.attn)}
    if torch.cuda.is_available():
        # one whole model per process: with torchrun/accelerate each rank takes its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if cfg.model.quant == "4bit":
        # QLoRA as in the TRL VLM guide: NF4 + double quantisation; bf16 compute on GPU, fp32 on CPU.
        compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return kwargs


def load_model(cfg: Config, *, training: bool = True, lora: bool = True) -> torch.nn.Module:
    """The base model, quantised per `model.quant`, wrapped in LoRA when training with finetune=lora
    (`lora=False`: prepared for training but bare, for models/base_once.py to wrap once per fold)."""
    if cfg.model.quant == "4bit" and cfg.model.finetune == "full":
        raise ValueError("model.quant=4bit cannot be fully fine-tuned; use model.finetune=lora (QLoRA)")
    path = resolve_model_path(cfg.model)
    model = AutoModelForImageTextToText.from_pretrained(path, **_model_kwargs(cfg))
    if not training:
        return model.eval()
    if cfg.model.quant == "4bit":
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is the trainer's switch (train.gradient_checkpointing), not ours.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.model.finetune == "lora" and lora:
        from vlmexp.models.lora import apply_lora

        model = apply_lora(model, cfg)
    return model


def load_for_inference(cfg: Config, adapter_dir: Path | None = None) -> torch.nn.Module:
    """Base model plus (optionally) a saved LoRA adapter, in eval mode.

    For finetune=full the "adapter" folder holds the whole fine-tuned model: it is loaded as the model.
    """
    if adapter_dir is not None and cfg.model.finetune == "full":
        full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(adapter_dir)))
        model = load_model(full, training=False)
    else:
        model = load_model(cfg, training=False)
    if adapter_dir is not None and cfg.model.finetune != "full":
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter folder?")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    if cfg.model.head == "cls":
        from vlmexp.engine.cls_head import load_head

        # the head sits beside the adapter, or in the model folder itself after `exp export`
        load_head(model, adapter_dir if adapter_dir is not None else resolve_model_path(cfg.model))
    return model.eval()
