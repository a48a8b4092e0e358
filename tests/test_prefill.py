"""engine/prefill.py: the scoring prefill computes only what is read of it, with the same numbers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.cache_utils import DynamicCache

from vlmexp.engine import scoring
from vlmexp.engine.predict import _encode
from vlmexp.engine.prefill import (
    KeepFirstLayer,
    last_decoder_layer,
    last_position_only,
    prefill_cache,
    unchecked_placeholders,
)
from vlmexp.models import tiny

FAMILIES = [f for f in tiny.FAMILIES if f != "qwen3_vl_moe"]
FULL_ATTENTION = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm", "llava"]


def _setup(tiny_models, family: str, texts: tuple[str, ...] = ("What is it?", "What is it?")):
    path = tiny_models(family)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for t in texts
    ]
    return model, processor, _encode(processor, prompts, [[img]] * len(texts))


class _Shapes:
    """Output shapes of each call of `module` (a forward hook: after any pre-hook changed its input)."""

    def __init__(self, module: torch.nn.Module):
        self.seen: list[tuple[int, ...]] = []
        module.register_forward_hook(self._record)

    def _record(self, _m, _args, out):
        self.seen.append(tuple((out[0] if isinstance(out, tuple) else out).shape))


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_projects_and_mlps_the_last_position_only_with_the_same_logits(family, tiny_models):
    model, _, enc = _setup(tiny_models, family)
    layer = last_decoder_layer(model)
    assert layer is not None
    mlp = _Shapes(layer.mlp)
    length = enc["input_ids"].shape[1]
    last = torch.tensor([length - 1])
    with torch.no_grad():
        want = model(**enc, logits_to_keep=last).logits
        with last_position_only(model):
            got = model(**enc, logits_to_keep=last).logits
        after = model(**enc, logits_to_keep=last).logits
    assert [s[1] for s in mlp.seen] == [length, 1, length]  # cut inside only; hooks gone after
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    if hasattr(getattr(layer, "self_attn", None), "o_proj"):
        o_proj = _Shapes(layer.self_attn.o_proj)
        with torch.no_grad(), last_position_only(model):
            model(**enc, logits_to_keep=last)
        assert o_proj.seen[0][1] == 1


def test_other_threads_forwards_see_the_whole_layer(tiny_models):
    """The hooks are on shared modules; only the thread inside the context cuts (e.g. `exp serve`'s other
    request threads keep their candidates' pass whole)."""
    model, _, enc = _setup(tiny_models, "qwen2_5_vl")
    mlp = _Shapes(last_decoder_layer(model).mlp)
    with torch.no_grad(), last_position_only(model):
        other = threading.Thread(target=lambda: model(**enc))
        other.start()
        other.join()
        model(**enc)
    assert [s[1] for s in mlp.seen] == [enc["input_ids"].shape[1], 1]


class _Cats(TorchDispatchMode):
    """Output shapes of every aten.cat onto an empty tensor: a cache layer's first update, copying."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default and out.numel() and any(t.numel() == 0 for t in args[0]):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("family", FULL_ATTENTION)
def test_prefill_cache_keeps_the_prompts_keys_without_a_copy(family, tiny_models):
    model, _, enc = _setup(tiny_models, family)
    cache = prefill_cache(model)
    assert cache is not None and all(type(layer) is KeepFirstLayer for layer in cache.layers)
    length = enc["input_ids"].shape[1]
    arg = scoring._cache_arg(model, cache)
    plain_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with _Cats() as plain:
            model(**enc, use_cache=True, **scoring._cache_arg(model, plain_cache))
        with _Cats() as kept:
            model(**enc, use_cache=True, **arg)
        # a later update (the candidates' pass) still appends
        k, v = cache.layers[0].keys, cache.layers[0].values
        extra = torch.randn(*k.shape[:2], 3, k.shape[-1]), torch.randn(*v.shape[:2], 3, v.shape[-1])
        cache.layers[0].update(*extra)
    n_layers = len(cache.layers)
    # transformers' layer concatenates each layer's keys and values onto an empty tensor: 2 copies a layer
    assert len(plain.shapes) == 2 * n_layers and all(s[-2] == length for s in plain.shapes)
    assert kept.shapes == []
    for ours, theirs in zip(cache.layers[1:], plain_cache.layers[1:], strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=0)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0].keys, torch.cat([k, extra[0]], dim=-2), rtol=0, atol=0)
    assert cache.layers[0].get_seq_length() == length + 3
    assert cache.layers[1].get_seq_length() == length


@pytest.mark.parametrize("family", ["gemma3", "qwen3_5"])
def test_prefill_cache_leaves_other_cache_layers_to_the_model(family, tiny_models):
    model, _, _ = _setup(tiny_models, family)
    assert prefill_cache(model) is None


def test_an_unpadded_batch_prefills_without_a_mask_and_scores_as_a_padded_one(tiny_models):
    """No row padded: the prefill gets no attention mask (on a GPU transformers would read the mask back
    to find that out, a host sync); a padded batch keeps its mask. A row's scores are the same either way."""
    model, processor, padded = _setup(tiny_models, "qwen2_5_vl", ("What is it?", "What is it, in one word?"))
    _, _, alone = _setup(tiny_models, "qwen2_5_vl", ("What is it?",))
    assert not bool(padded["attention_mask"].all()) and bool(alone["attention_mask"].all())
    masks: list[torch.Tensor | None] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True
    )
    tok = processor.tokenizer
    cands = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ("red", "blue")]
    with torch.no_grad():
        both = scoring.score_candidates(model, padded, [cands] * 2)
        one = scoring.score_candidates(model, alone, [cands])
        wrong = scoring.score_candidates(model, padded, [cands] * 2, unpadded=True)  # a CPU mask says
    prefills = masks[0::2]  # each call: the prefill, then the candidates' pass
    assert prefills[0] is not None and prefills[1] is None and prefills[2] is not None
    torch.testing.assert_close(wrong, both, rtol=0, atol=0)
    torch.testing.assert_close(one[0], both[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_scoring_prefills_through_the_levers(family, tiny_models, monkeypatch):
    """score_candidates' prefill: the last layer's MLP on one position, no copy of the prompt's keys
    into the cache (full attention; Gemma 3's sliding layers keep the model's own cache), no placeholder
    count check (Qwen-VL; Gemma 3 has no unchecked form); its candidates' pass runs the layer whole."""
    import importlib

    model, processor, enc = _setup(tiny_models, family)
    mlp = _Shapes(last_decoder_layer(model).mlp)
    modeling = importlib.import_module(type(model.model).__module__)
    checks: list[bool] = []
    real = modeling.torch_compilable_check
    monkeypatch.setattr(
        modeling, "torch_compilable_check", lambda *a, **k: (checks.append(True), real(*a, **k))
    )
    tok = processor.tokenizer
    cands = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ("red", "blue")]
    with torch.no_grad(), _Cats() as cats:
        scoring.score_candidates(model, enc, [cands] * 2)
    width = sum(len(c) - 1 for c in cands)
    assert mlp.seen[0][1] == 1
    assert mlp.seen[1][1] == (width if family == "qwen2_5_vl" else max(len(c) for c in cands) - 1)
    qwen = family == "qwen2_5_vl"
    assert (cats.shapes == []) == qwen
    assert (checks == []) == qwen


@pytest.mark.gpu
def test_on_cuda_with_the_speed_levers_the_scores_equal_the_whole_prefills(tiny_models, monkeypatch):
    """The CUDA path (liger's SwiGLU and norms, packed GQA in the candidates' pass, the caller's word that
    no row is padded): the same scores as the whole prefill with its mask and transformers' cache."""
    from contextlib import nullcontext

    from vlmexp.config import load_config
    from vlmexp.engine import speed

    cfg = load_config([f"model.name={tiny_models('qwen2_5_vl')}"])
    model, processor, padded = _setup(tiny_models, "qwen2_5_vl", ("What is it?", "What is it, in one word?"))
    _, _, same = _setup(tiny_models, "qwen2_5_vl")
    model = model.cuda()
    speed.prepare(model, cfg)
    tok = processor.tokenizer
    cands = [
        [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ("red", "blue")]
    ] * 2
    padded, same = ({k: v.cuda() for k, v in enc.items()} for enc in (padded, same))
    with torch.no_grad():
        got = [
            scoring.score_candidates(model, padded, cands),
            scoring.score_candidates(model, same, cands, unpadded=True),
        ]
        monkeypatch.setattr(scoring, "last_position_only", lambda _m: nullcontext())
        monkeypatch.setattr(scoring, "prefill_cache", lambda _m: None)
        want = [scoring.score_candidates(model, padded, cands), scoring.score_candidates(model, same, cands)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_placeholder_masks_come_without_the_count_check_inside_only(family, tiny_models, monkeypatch):
    """Qwen-VL's `get_placeholder_mask` reads the image-token count back from the GPU to check it against
    the features (a host sync); inside `unchecked_placeholders` it gives the same masks unchecked, and
    outside it (later, or on another thread) it checks again. A deep copy binds its own copy."""
    import copy
    import importlib

    model, _, enc = _setup(tiny_models, family)
    core = model.model
    modeling = importlib.import_module(type(core).__module__)
    checks: list[bool] = []
    real = modeling.torch_compilable_check
    monkeypatch.setattr(
        modeling, "torch_compilable_check", lambda *a, **k: (checks.append(True), real(*a, **k))
    )
    ids = enc["input_ids"]
    embeds = core.get_input_embeddings()(ids)
    n = int((ids == model.config.image_token_id).sum())
    feats = torch.zeros(n, embeds.shape[-1])
    want = core.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
    assert checks
    checks.clear()
    with unchecked_placeholders(model):
        got = core.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
        other = threading.Thread(
            target=lambda: core.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
        )
        other.start()
        other.join()
    assert len(checks) == 1  # the other thread's call only
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    core.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=feats)
    assert len(checks) == 2
    twin = copy.deepcopy(model)
    assert twin.model.get_placeholder_mask.__self__ is twin.model
