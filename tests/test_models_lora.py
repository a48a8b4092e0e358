"""LoRA module selection by full path, per family and switch combination; QLoRA on the CPU."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vlmexp.config import LoraConfig, load_config
from vlmexp.models import tiny
from vlmexp.models.load import load_model, load_processor
from vlmexp.models.lora import apply_lora, classify, select_target_modules, select_target_parameters

# The real module layout of each family, written out by hand so the test does not trust classify():
# (language layers, vision block 0, vision attention leaves, vision mlp leaves).
_QWEN3_VISION = ("model.visual.blocks.0", ["attn.qkv", "attn.proj"], ["mlp.linear_fc1", "mlp.linear_fc2"])
_GEMMA_VISION_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LAYOUT = {
    "qwen2_vl": (
        "model.language_model.layers",
        "model.visual.blocks.0",
        ["attn.qkv", "attn.proj"],
        ["mlp.fc1", "mlp.fc2"],
    ),
    "qwen2_5_vl": (
        "model.language_model.layers",
        "model.visual.blocks.0",
        ["attn.qkv", "attn.proj"],
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "smolvlm": (
        "model.text_model.layers",
        "model.vision_model.encoder.layers.0",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
        ["mlp.fc1", "mlp.fc2"],
    ),
    "llava": (
        "model.language_model.layers",
        "model.vision_tower.encoder.layers.0",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
        ["mlp.fc1", "mlp.fc2"],
    ),
    "qwen3_vl": ("model.language_model.layers", *_QWEN3_VISION),
    "qwen3_vl_moe": ("model.language_model.layers", *_QWEN3_VISION),
    "qwen3_5": ("model.language_model.layers", *_QWEN3_VISION),
    "gemma3": (
        "model.language_model.layers",
        "model.vision_tower.encoder.layers.0",
        [*_GEMMA_VISION_ATTN, "self_attn.out_proj"],
        ["mlp.fc1", "mlp.fc2"],
    ),
    # Gemma 4 wraps each vision Linear in a clippable module: the Linear is `<name>.linear`
    "gemma4": (
        "model.language_model.layers",
        "model.vision_tower.encoder.layers.0",
        [f"{x}.linear" for x in [*_GEMMA_VISION_ATTN, "self_attn.o_proj"]],
        [f"mlp.{p}_proj.linear" for p in ("gate", "up", "down")],
    ),
}
VISION_BLOCKS = {"qwen3_vl": 2, "qwen3_vl_moe": 2, "qwen3_5": 2}  # two blocks: deepstack after block 0
# Qwen3.5's layer 0 is a gated-delta-net layer: its projections stand where attention does
LINEAR_ATTN = [f"linear_attn.in_proj_{x}" for x in ("qkv", "z", "b", "a")] + ["linear_attn.out_proj"]
# Qwen3-VL-MoE's experts are fused 3D parameters: LoRA reaches them as target_parameters
EXPERTS = {
    "qwen3_vl_moe": {
        f"model.language_model.layers.{i}.mlp.experts.{w}_proj" for i in (0, 1) for w in ("gate_up", "down")
    }
}


def expected(family: str) -> dict[tuple[str, str], set[str]]:
    lang, vis, vis_attn, vis_mlp = LAYOUT[family]
    lang_attn = {f"{lang}.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    lang_mlp = {f"{lang}.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    if family == "qwen3_5":
        lang_attn = {f"{lang}.1.self_attn.{p}_proj" for p in "qkvo"} | {f"{lang}.0.{x}" for x in LINEAR_ATTN}
    if family in EXPERTS:
        lang_mlp = set()
    blocks = [f"{vis[:-1]}{b}" for b in range(VISION_BLOCKS.get(family, 1))]
    return {
        ("language", "attention"): lang_attn,
        ("language", "mlp"): lang_mlp,
        ("vision", "attention"): {f"{b}.{x}" for b in blocks for x in vis_attn},
        ("vision", "mlp"): {f"{b}.{x}" for b in blocks for x in vis_mlp},
    }


SWITCHES = {
    "language_only": dict(language=True, vision=False, attention=True, mlp=True),
    "vision_only": dict(language=False, vision=True, attention=True, mlp=True),
    "attention_only": dict(language=True, vision=True, attention=True, mlp=False),
    "mlp_only": dict(language=True, vision=True, attention=False, mlp=True),
    "all": dict(language=True, vision=True, attention=True, mlp=True),
    "language_attention": dict(language=True, vision=False, attention=True, mlp=False),
}


def _want(family: str, sw: dict) -> set[str]:
    towers = {t for t in ("language", "vision") if sw[t]}
    kinds = {k for k in ("attention", "mlp") if sw[k]}
    return set().union(*(names for (t, k), names in expected(family).items() if t in towers and k in kinds))


def _lora_modules(peft_model) -> set[str]:
    prefix = "base_model.model."
    out = set()
    for name, _ in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            # peft stacks one wrapper per targeted parameter: experts.base_layer.lora_A is still experts
            out.add(name.split(".lora_")[0].removeprefix(prefix).replace(".base_layer", ""))
    return out


@pytest.fixture(scope="module")
def models(tiny_models):
    return {f: AutoModelForImageTextToText.from_pretrained(tiny_models(f)) for f in tiny.FAMILIES}


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("combo", list(SWITCHES))
def test_switch_selection(family, combo, models):
    sw = SWITCHES[combo]
    chosen = select_target_modules(models[family], LoraConfig(**sw))
    assert set(chosen) == _want(family, sw)
    assert len(chosen) == len(set(chosen))
    vision_prefix, lang_prefix = LAYOUT[family][1].rsplit(".", 1)[0], LAYOUT[family][0]
    if not sw["vision"]:
        assert not any(n.startswith(vision_prefix) for n in chosen)
    if not sw["language"]:
        assert not any(n.startswith(lang_prefix) for n in chosen)
    if not sw["mlp"]:
        assert not any(".mlp." in n for n in chosen)
    # projectors/mergers and lm_head are never picked by a switch
    never = ("merger", "projector", "connector", "embed_vision", "lm_head")
    assert not any(x in n for n in chosen for x in never)
    experts = EXPERTS.get(family, set()) if sw["language"] and sw["mlp"] else set()
    assert set(select_target_parameters(models[family], LoraConfig(**sw))) == experts


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("combo", ["language_only", "vision_only", "attention_only"])
def test_apply_lora_puts_adapters_exactly_there(family, combo, tiny_models):
    sw = SWITCHES[combo]
    model = AutoModelForImageTextToText.from_pretrained(tiny_models(family))
    cfg = load_config([f"lora.{k}={str(v).lower()}" for k, v in sw.items()] + ["lora.r=4"])
    peft_model = apply_lora(model, cfg)
    experts = EXPERTS.get(family, set()) if sw["language"] and sw["mlp"] else set()
    assert _lora_modules(peft_model) == _want(family, sw) | {n.rsplit(".", 1)[0] for n in experts}
    assert set(peft_model.peft_config["default"].target_parameters or ()) == experts
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_explicit_target_modules(models):
    model = models["llava"]
    leaf = select_target_modules(model, LoraConfig(target_modules=["q_proj"]))
    # a bare leaf name hits the vision tower too: that is why the switches use full paths
    assert set(leaf) == {
        "model.vision_tower.encoder.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.q_proj",
    }
    rx = select_target_modules(
        model, LoraConfig(target_modules=[r".*language_model.*\.(q|v)_proj", "lm_head"])
    )
    assert set(rx) == {
        f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"
    } | {"lm_head"}
    with pytest.raises(ValueError, match="'qproj' matches no Linear"):
        select_target_modules(model, LoraConfig(target_modules=["qproj"]))


def test_empty_selection_is_an_error(models):
    with pytest.raises(ValueError, match="selects no module"):
        select_target_modules(models["qwen2_vl"], LoraConfig(language=False, vision=False))
    with pytest.raises(ValueError, match="selects no module"):
        select_target_modules(models["smolvlm"], LoraConfig(attention=False, mlp=False))


@pytest.mark.parametrize(
    "name, want",
    [
        # layouts of families without a tiny builder: Qwen3-VL, Gemma 3, old Qwen2-VL
        ("model.visual.blocks.3.mlp.linear_fc1", ("vision", "mlp")),
        ("model.visual.deepstack_merger_list.0.linear_fc1", ("projector", "other")),
        ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", ("vision", "attention")),
        ("model.language_model.layers.5.self_attn.o_proj", ("language", "attention")),
        ("model.layers.0.mlp.down_proj", ("language", "mlp")),
        ("visual.blocks.0.attn.proj", ("vision", "attention")),
        ("model.multi_modal_projector.mm_input_projection", ("projector", "other")),
        ("model.embed_vision.embedding_projection", ("projector", "other")),
        ("model.language_model.layers.0.linear_attn.in_proj_qkv", ("language", "attention")),
        ("lm_head", ("other", "other")),
    ],
)
def test_classify_other_layouts(name, want):
    assert classify(name) == want


def _qlora_one_step(tmp_path, device: str) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = load_config(
        ["model.name=tiny:qwen2_vl", f"model.cache_dir={tmp_path}", "model.quant=4bit", "lora.r=4"]
    )
    model = load_model(cfg, training=True)
    assert getattr(model, "is_loaded_in_4bit", False)
    assert next(model.parameters()).device.type == device
    linear4 = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert linear4, "no bitsandbytes Linear4bit modules: the model was not quantised"
    assert _lora_modules(model) == _want("qwen2_vl", SWITCHES["language_only"])

    processor = load_processor(cfg)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which class?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "label_a"}]},
    ]
    text = processor.apply_chat_template(messages)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    batch = processor(text=[text, text], images=images, return_tensors="pt").to(device)
    batch["labels"] = batch["input_ids"].clone()

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
    # lora_B starts at zero, so the first step moves every B (A's gradient is zero while B is)
    assert {n for n in params if ".lora_B." in n} <= set(changed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the loader puts the model there")
def test_qlora_one_step_on_cpu(tmp_path):
    _qlora_one_step(tmp_path, "cpu")


@pytest.mark.gpu
def test_qlora_one_step_on_cuda(tmp_path):
    # bf16 compute dtype on the GPU; the 4-bit kernels differ from the CPU ones
    _qlora_one_step(tmp_path, "cuda")
