"""Choose LoRA target modules by full path, then wrap the model with peft.

Leaf names alone are ambiguous in a VLM: `q_proj` is in the language model *and* in the vision
towers of LLaVA/SmolVLM, `gate_proj` in Qwen2.5-VL's too. So every Linear is classified by its full
name, e.g. `model.visual.blocks.0.attn.qkv` -> (vision, attention), and the four switches
`lora.language/vision/attention/mlp` pick from those classes (like Unsloth's
`finetune_language_layers` etc.). peft gets the exact list of full names.

Mixture-of-experts language models (Qwen3-VL-30B-A3B) keep their experts as fused 3D parameters,
e.g. `model.language_model.layers.0.mlp.experts.gate_up_proj` (128 experts x 1536 x 2048), not as
Linear modules: the mlp switch would otherwise adapt nothing there. They go to peft as
`target_parameters` (`select_target_parameters`); the router (`mlp.gate`) is never adapted.
"""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from vlmexp.config import Config
from vlmexp.config import LoraConfig as LoraSettings

log = logging.getLogger(__name__)

# Path parts, matched as whole dotted components.
_VISION = {"visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder"}
_LANGUAGE = {"language_model", "text_model", "llm"}
# Projectors between the towers (Qwen's `visual.merger` lives *inside* the vision tower) are never
# picked by a switch: they are small and new-task adaptation belongs in the towers.
_PROJECTOR = {
    "merger",
    "deepstack_merger_list",
    "multi_modal_projector",
    "mm_projector",
    "connector",
    "modality_projection",
    "embed_vision",  # Gemma 3n/4: soft-token projection into the language model
}
# linear_attn: Qwen3.5's gated-delta-net layers (in_proj_qkv/z/a/b, out_proj) stand where attention does
_ATTN_PARENTS = {"attn", "self_attn", "attention", "cross_attn", "self_attention", "linear_attn"}
_ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "qkv_proj", "out_proj"}
_MLP_PARENTS = {"mlp", "feed_forward", "ffn"}
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2"}


def classify(name: str) -> tuple[str, str]:
    """(tower, kind) of a module's full name; tower in language/vision/projector/other, kind in
    attention/mlp/other. E.g. "model.text_model.layers.1.mlp.up_proj" -> ("language", "mlp")."""
    parts = name.split(".")
    if parts[-1] == "lm_head":
        return "other", "other"
    if set(parts) & _PROJECTOR:
        return "projector", "other"
    if set(parts) & _VISION:
        tower = "vision"
    elif set(parts) & _LANGUAGE or re.match(r"(model\.)?layers\.\d+\.", name):
        # `model.layers.N` is the plain causal-LM layout some VLMs keep for their language model
        tower = "language"
    else:
        tower = "other"
    parents, leaf = set(parts[:-1]), parts[-1]
    if leaf in _ATTN_LEAVES or parents & _ATTN_PARENTS:
        kind = "attention"
    elif leaf in _MLP_LEAVES or parents & _MLP_PARENTS:
        kind = "mlp"
    else:
        kind = "other"
    return tower, kind


def linear_modules(model: torch.nn.Module) -> list[str]:
    """Full names of every Linear (bitsandbytes' Linear4bit/Linear8bitLt subclass nn.Linear)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


_EXPERT_WEIGHT = re.compile(r".*\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)")


def select_target_parameters(model: torch.nn.Module, lora_cfg: LoraSettings) -> list[str]:
    """Full names of fused MoE expert weights (3D parameters) the switches pick: language + mlp.
    Empty for dense models and when `lora.target_modules` lists modules explicitly."""
    if lora_cfg.target_modules or not (lora_cfg.language and lora_cfg.mlp):
        return []
    return [
        n
        for n, p in model.named_parameters()
        if p.dim() == 3 and _EXPERT_WEIGHT.fullmatch(n) and classify(n)[0] == "language"
    ]


def select_target_modules(model: torch.nn.Module, lora_cfg: LoraSettings) -> list[str]:
    """Full names of the Linear modules LoRA should adapt, per the switches or `target_modules`."""
    names = linear_modules(model)
    if lora_cfg.target_modules:
        return _explicit(names, lora_cfg.target_modules)
    towers = {t for t, on in (("language", lora_cfg.language), ("vision", lora_cfg.vision)) if on}
    kinds = {k for k, on in (("attention", lora_cfg.attention), ("mlp", lora_cfg.mlp)) if on}
    chosen = [n for n in names if (c := classify(n))[0] in towers and c[1] in kinds]
    if not chosen and not select_target_parameters(model, lora_cfg):
        raise ValueError(
            f"LoRA selects no module: lora.language={lora_cfg.language} lora.vision={lora_cfg.vision} "
            f"lora.attention={lora_cfg.attention} lora.mlp={lora_cfg.mlp} on {type(model).__name__}. "
            "Turn on at least one of language/vision and one of attention/mlp, or list "
            f"lora.target_modules explicitly; its Linear modules include e.g. {names[:4]}"
        )
    return chosen


def _explicit(names: list[str], patterns: list[str]) -> list[str]:
    # An entry is a leaf name ("q_proj": all of them, vision towers included) or a regex
    # fully matching full names (r".*language_model.*\.(q|v)_proj").
    chosen: set[str] = set()
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"lora.target_modules entry '{pattern}' is not a valid regex: {e}") from None
        hits = {n for n in names if n.rsplit(".", 1)[-1] == pattern or rx.fullmatch(n)}
        if not hits:
            raise ValueError(
                f"lora.target_modules entry '{pattern}' matches no Linear module (it must be a leaf name "
                f"or a regex matching whole names); e.g. {names[:4]}"
            )
        chosen |= hits
    return [n for n in names if n in chosen]


def apply_lora(model: torch.nn.Module, cfg: Config) -> PeftModel:
    """Wrap `model` in a peft LoRA adapter on exactly `select_target_modules(model, cfg.lora)`."""
    lc = cfg.lora
    targets = select_target_modules(model, lc)
    experts = select_target_parameters(model, lc)
    dropout = lc.dropout
    if experts and dropout:
        # peft's LoRA on a parameter (ParamWrapper) refuses dropout: lora_B(lora_A(dropout(x))) does not
        # factor out of the fused expert matmul. One adapter has one dropout, so it is 0 for all of it.
        log.warning(
            "lora.dropout=%s set to 0: LoRA on fused MoE expert weights (%d of them, e.g. %s) takes no "
            "dropout. Set lora.dropout=0 to silence this, or lora.mlp=false to leave the experts alone.",
            dropout,
            len(experts),
            experts[0],
        )
        dropout = 0.0
    peft_cfg = PeftLoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=dropout,
        use_rslora=lc.rslora,
        bias=lc.bias,
        modules_to_save=list(lc.modules_to_save) or None,
        # A list is matched by exact name (or name suffix): full names pin the exact modules.
        target_modules=targets,
        target_parameters=experts or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
