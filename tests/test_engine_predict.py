"""engine/predict.py on tiny random models: cached scoring = naive scoring, batched = one by one."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmexp.config import Config
from vlmexp.engine import predict as predict_mod
from vlmexp.engine.predict import _cut_at_marker, _encode, predict
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.models import tiny
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns

# Qwen3-VL-MoE differs from Qwen3-VL only in its MLP (covered by the LoRA, export and 2-fold tests)
FAMILIES = [f for f in tiny.FAMILIES if f != "qwen3_vl_moe"]
# Generation is transformers' own loop: beside the original four, only the families whose cache differs
# (Qwen3.5's recurrent states, Gemma 3's sliding window) run it, to keep the suite fast on 2 cores.
GENERATE = ["qwen2_vl", "qwen2_5_vl", "smolvlm", "llava", "qwen3_5", "gemma3"]
# Labels of different token lengths that share first tokens (label_a / label_b), and a CJK one.
LABELS = ["red", "label_a", "label_b", "退款页面"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Five rows with different image sizes and colours, so prompts pad differently in a batch."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(64, 48), (90, 70), (40, 40), (112, 56), (30, 80)]):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = d / f"{i}.png"
        Image.fromarray(arr).save(path)
        out.append({"id": f"s{i}", "image": str(path), "note": "x" * (7 * i)})
    return pd.DataFrame(out)


def _setup(tiny_models, family: str, rows, prompt: str = "baseline"):
    path = tiny_models(family)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    cfg = Config()
    cfg.prompt = prompt
    cfg.predict.max_new_tokens = 8
    samples = build_samples(
        rows, labels=LABELS, descriptions={}, template=load_template(prompt), cfg=cfg, with_answer=False
    )
    # Row-dependent prompt lengths: each row's note is appended to its user text.
    for s, note in zip(samples, rows["note"], strict=True):
        s["messages"][-1]["content"][-1]["text"] += note
    return cfg, model, processor, samples


def _naive_logprobs(model, processor, sample, labels) -> np.ndarray:
    """Each label's log-likelihood by a full forward over prompt + completion (no cache reuse)."""
    turn = split_turn(processor, sample["messages"])
    tok = processor.tokenizer
    scores = []
    with torch.no_grad():
        n_prompt = _encode(processor, [turn.prompt], [sample["images"]])["input_ids"].shape[1]
        for label in labels:
            ids = tok(turn.completion(label), add_special_tokens=False)["input_ids"]
            enc = _encode(processor, [turn.prompt], [sample["images"]], extra=[ids])
            logp = model(**enc).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[n_prompt - 1 + j, t].item() for j, t in enumerate(ids)))
    scores = torch.tensor(scores)
    return (scores - scores.logsumexp(0)).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_scoring_matches_naive_full_sequence_scoring(family, tiny_models, rows):
    cfg, model, processor, samples = _setup(tiny_models, family, rows)
    cfg.predict.batch_size = 5
    table = predict(cfg, model, processor, samples, LABELS, progress=False)
    assert list(table.columns) == ["id", "pred", *prob_columns(LABELS)]
    got = np.log(table[prob_columns(LABELS)].to_numpy(dtype=float))
    want = np.stack([_naive_logprobs(model, processor, s, LABELS) for s in samples])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert table["pred"].tolist() == [LABELS[i] for i in want.argmax(1)]


@pytest.mark.parametrize(
    "mode, family", [("score", f) for f in FAMILIES] + [("generate", f) for f in GENERATE]
)
def test_batched_equals_one_by_one(family, mode, tiny_models, rows):
    cfg, model, processor, samples = _setup(tiny_models, family, rows)
    cfg.predict.mode = mode
    cfg.predict.batch_size = 4  # one full batch and one short one
    batched = predict(cfg, model, processor, samples, LABELS, progress=False)
    cfg.predict.batch_size = 1
    single = predict(cfg, model, processor, samples, LABELS, progress=False)
    assert batched["id"].tolist() == [s["id"] for s in samples]
    assert batched["pred"].tolist() == single["pred"].tolist()
    probs = prob_columns(LABELS)
    np.testing.assert_allclose(batched[probs].to_numpy(float), single[probs].to_numpy(float), atol=1e-4)
    if mode == "generate":
        assert batched["raw"].tolist() == single["raw"].tolist()
    else:
        np.testing.assert_allclose(batched[probs].sum(axis=1), 1.0, atol=1e-5)


def test_batches_go_longest_prompt_first_and_rows_come_back_in_order(tiny_models, rows, monkeypatch):
    """predict() batches by prompt length (less padding) and returns rows in the samples' order."""
    cfg, model, processor, samples = _setup(tiny_models, "qwen2_5_vl", rows)
    cfg.predict.batch_size = 2
    seen: list[str] = []
    real = predict_mod._score_rows

    def spy(cfg, model, processor, batch, *args, **kwargs):
        seen.extend(s["id"] for s in batch)
        return real(cfg, model, processor, batch, *args, **kwargs)

    monkeypatch.setattr(predict_mod, "_score_rows", spy)
    table = predict(cfg, model, processor, samples, LABELS, progress=False)
    length = {}
    for s in samples:
        prompt = split_turn(processor, s["messages"]).prompt
        length[s["id"]] = _encode(processor, [prompt], [s["images"]])["input_ids"].shape[1]
    assert [length[i] for i in seen] == sorted(length.values(), reverse=True)
    assert seen != [s["id"] for s in samples]  # the rows' own order is not by length
    assert table["id"].tolist() == [s["id"] for s in samples]


@pytest.mark.parametrize("family", ["qwen2_vl", "smolvlm", "qwen3_5"])
def test_reasoning_variant_generates_to_the_marker_then_scores(family, tiny_models, rows):
    cfg, model, processor, samples = _setup(tiny_models, family, rows, prompt="reason_label")
    cfg.predict.batch_size = 3
    batched = predict(cfg, model, processor, samples, LABELS, progress=False)
    cfg.predict.batch_size = 1
    single = predict(cfg, model, processor, samples, LABELS, progress=False)
    probs = prob_columns(LABELS)
    assert "raw" in batched.columns and batched["raw"].tolist() == single["raw"].tolist()
    assert batched["pred"].notna().all()  # scoring never fails to parse
    np.testing.assert_allclose(batched[probs].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched[probs].to_numpy(float), single[probs].to_numpy(float), atol=1e-4)


def test_cut_at_marker():
    assert _cut_at_marker("Reason: red tag.\nLabel: re", "Label: ", "") == "Reason: red tag.\nLabel: "
    assert _cut_at_marker("Reason: red tag.\nLabel:", "Label: ", "") == "Reason: red tag.\nLabel: "
    # no marker in what was generated: the labels are scored after it, on a new line
    assert _cut_at_marker("Reason: red tag. ", "Label: ", "") == "Reason: red tag.\nLabel: "
    assert _cut_at_marker("", "Label: ", " ") == " Label: "


def test_generate_parses_and_counts_failures(tiny_models, rows, monkeypatch, caplog):
    cfg, model, processor, samples = _setup(tiny_models, "qwen2_vl", rows)
    cfg.predict.mode = "generate"
    texts = ["red", " Label_B.", "no idea", "退款页面\nbecause", "label"]
    answers = {s["id"]: text for s, text in zip(samples, texts, strict=True)}

    def fake_generate(cfg, model, processor, batch, turns, stop=None):
        # by sample: predict() batches the samples longest prompt first, not in their order
        return [answers[s["id"]] for s in batch]

    monkeypatch.setattr(predict_mod, "_generate", fake_generate)
    with caplog.at_level(logging.WARNING):
        table = predict(cfg, model, processor, samples, LABELS, progress=False)
    assert table["pred"].tolist()[:2] == ["red", "label_b"]
    assert table["pred"].tolist()[3] == "退款页面"
    assert table["pred"].isna().tolist() == [False, False, True, False, True]
    p = table[prob_columns(LABELS)].to_numpy(float)
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0] and p[2].tolist() == [0.0] * 4
    assert "2 of 5 generated answers name no label" in caplog.text
    assert table["raw"].tolist()[2] == "no idea"


def _bench_tiny():
    from vlmexp.bench.shapes import build_model, build_processor, get_shape
    from vlmexp.bench.synth import make_samples

    shape = get_shape("tiny")
    processor = build_processor(shape, 224)
    return build_model(shape, seed=1).eval(), processor, make_samples(processor, 2, 224, 120, seed=3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["tree", "repeat"])
def test_score_candidates_on_cached_vision_features_equals_scoring_from_scratch(layout, attn):
    from vlmexp.bench.synth import candidate_ids, collate_prompts, labels
    from vlmexp.engine.vision_cache import VisionFeatureCache

    model, processor, samples = _bench_tiny()
    model.set_attn_implementation(attn)
    short = dict(
        samples[1],
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Label?"}]}],
    )
    batch = [samples[0], short]
    cands = candidate_ids(processor, labels(4)) + [[7]]  # a single-token candidate too
    ctx = collate_prompts(processor, batch)
    assert (ctx["attention_mask"] == 0).any()  # left-padded
    model.requires_grad_(False)
    mm = VisionFeatureCache().encoder_outputs(
        model, ctx["pixel_values"], ctx["image_grid_thw"], [s["id"] for s in batch]
    )
    cached = {k: v for k, v in ctx.items() if k != "pixel_values"} | {"mm_encoder_outputs": mm}
    with torch.no_grad():
        got = predict_mod.score_candidates(model, cached, [cands] * 2, layout=layout)
        plain = predict_mod.score_candidates(model, ctx, [cands] * 2, layout=layout)
        for b, sample in enumerate(batch):
            one = collate_prompts(processor, [sample])
            n = one["input_ids"].shape[1]
            for c, cand in enumerate(cands):
                ids = torch.cat([one["input_ids"], torch.tensor([cand])], 1)
                types = torch.cat([one["mm_token_type_ids"], torch.zeros(1, len(cand), dtype=torch.int)], 1)
                logp = (
                    model(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        pixel_values=one["pixel_values"],
                        image_grid_thw=one["image_grid_thw"],
                        mm_token_type_ids=types,
                    )
                    .logits[0]
                    .float()
                    .log_softmax(-1)
                )
                want = sum(logp[n - 1 + j, t].item() for j, t in enumerate(cand))
                assert got[b, c].item() == pytest.approx(want, abs=1e-4)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_score_candidates_refuses_right_padding():
    from vlmexp.bench.synth import collate_prompts

    model, processor, samples = _bench_tiny()
    ctx = collate_prompts(processor, samples)
    ctx["attention_mask"] = ctx["attention_mask"].clone()
    ctx["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        predict_mod.score_candidates(model, ctx, [[[1, 2]], [[1, 2]]])


def test_the_next_batch_is_queued_before_the_last_ones_scores_are_read(tiny_models, rows, monkeypatch):
    """predict() reads a batch's scores (on a GPU: waits for them) only after the next batch is built
    and queued, so building it overlaps the GPU's work on the last one."""
    cfg, model, processor, samples = _setup(tiny_models, "qwen2_5_vl", rows)
    cfg.predict.batch_size = 2  # 5 rows: 3 batches
    events: list[str] = []
    real_score, real_host = predict_mod.score_completions, predict_mod._on_host

    def score(*args, **kwargs):
        events.append("queue")
        return real_score(*args, **kwargs)

    def on_host(t):
        read, n = real_host(t), events.count("queue") - 1
        return lambda: (events.append(f"read{n}"), read())[1]

    monkeypatch.setattr(predict_mod, "score_completions", score)
    monkeypatch.setattr(predict_mod, "_on_host", on_host)
    table = predict(cfg, model, processor, samples, LABELS, progress=False)
    assert events == ["queue", "queue", "read0", "queue", "read1", "read2"]
    cfg.predict.batch_size = 5
    one_batch = predict(cfg, model, processor, samples, LABELS, progress=False)
    cols = prob_columns(LABELS)
    np.testing.assert_allclose(table[cols].to_numpy(float), one_batch[cols].to_numpy(float), atol=1e-5)


def test_new_images_go_through_the_tower_by_size_before_scoring(tiny_models, rows, monkeypatch):
    """With the run's caches, predict() computes every new image's features first, in tower calls of one
    image size (`vision_prepass`), so scoring batches run on cached features only; same scores."""
    from vlmexp.engine.run_caches import RunCaches
    from vlmexp.engine.vision_cache import VisionFeatureCache

    cfg, model, processor, samples = _setup(tiny_models, "qwen2_5_vl", rows)
    model.requires_grad_(False)
    cfg.predict.batch_size = 2
    want = predict(cfg, model, processor, samples, LABELS, progress=False)
    caches = RunCaches.for_run(cfg, processor)
    caches.vision_trains = False  # as training found it: a frozen tower
    grids, real = [], VisionFeatureCache.features

    def features(self, model, keys, image_grid_thw, pixel_values=None, pixel_index=()):
        grids.append({tuple(image_grid_thw[i].tolist()) for i in pixel_index})
        return real(self, model, keys, image_grid_thw, pixel_values, pixel_index)

    monkeypatch.setattr(VisionFeatureCache, "features", features)
    got = predict(cfg, model, processor, samples, LABELS, progress=False, caches=caches)
    computed = [g for g in grids if g]
    # the 5 images' tower calls, each of one size, all before the 3 scoring batches (nothing computed)
    assert len(computed) >= 2 and all(len(g) == 1 for g in computed)
    assert grids[len(computed) :] == [set()] * 3 and len(caches.vision) == 5
    cols = prob_columns(LABELS)
    np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-5)
    assert got["pred"].tolist() == want["pred"].tolist()


@pytest.mark.gpu
def test_scoring_queues_its_work_without_a_host_sync_of_its_own(tiny_models, rows):
    """score_candidates(on_device=True) on a GPU: no host sync in the project's code (the candidate ids,
    the tree's indices, the read of the real tokens), so predict() can build the next batch while the GPU
    runs this one. transformers' own checks inside the forward may still sync."""
    from vlmexp.bench.profile import SyncSites
    from vlmexp.engine.transfer import tensors_to

    cfg, model, processor, samples = _setup(tiny_models, "qwen2_5_vl", rows)
    model = model.cuda()
    turns = [split_turn(processor, s["messages"]) for s in samples]
    ctx = _encode(processor, [t.prompt for t in turns], [s["images"] for s in samples])
    tok = processor.tokenizer
    cands = [[tok(turns[0].completion(label), add_special_tokens=False)["input_ids"] for label in LABELS]]
    assert max(len(c) for c in cands[0]) > 1  # the tree's second forward runs
    with torch.no_grad():
        gpu = tensors_to(ctx, "cuda")
        torch.cuda.synchronize()
        with SyncSites() as syncs:
            got = predict_mod.score_candidates(model, gpu, cands * len(samples), on_device=True)
        assert got.device.type == "cuda"
        want = predict_mod.score_candidates(model, gpu, cands * len(samples))  # read at once: on the CPU
    assert sum(syncs.sites.values()) > 0  # the watch works: transformers' padding-mask check syncs
    ours = [site for site in syncs.sites if site.startswith("vlmexp/")]
    assert not ours, syncs.report(1)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_scoring_reads_the_cache_without_transformers_deprecation_warning(tiny_models, rows, caplog):
    """transformers 5.24 renamed the output's `past_key_values` to `cache` and logs a warning when the old
    name is read: every `exp run` printed it once."""
    cfg, model, processor, samples = _setup(tiny_models, "qwen2_5_vl", rows)
    logging.Logger.warning_once.cache_clear()  # logged once per process: another test may have had it
    with caplog.at_level(logging.WARNING):
        predict(cfg, model, processor, samples[:2], LABELS, progress=False)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_tree_scoring_reads_the_candidates_logits_in_one_pass(tiny_models, rows, monkeypatch):
    """Every row's candidates as wide as the widest (one label set): no gather of the real positions, and
    the log-probabilities from one log_softmax that casts inside its kernel; the same scores as the
    padded layout, which still gathers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_5_vl")).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 7), generator=gen)
    ctx = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    same = [[5, 6, 7], [5, 8]]
    with torch.no_grad():
        with Ops() as ops:
            got = predict_mod.score_candidates(model, ctx, [same, same], layout="tree")
        # a row with fewer candidate tokens pads the tree: the real ones are gathered
        with Ops() as padded_ops:
            mixed = predict_mod.score_candidates(model, ctx, [same, [[5, 6, 7], [5]]], layout="tree")
    assert "index_select.default" not in ops.names and "logsumexp.default" not in ops.names
    assert "index_select.default" in padded_ops.names
    torch.testing.assert_close(got[0], mixed[0], rtol=1e-5, atol=1e-5)
    want = predict_mod.score_candidates(model, ctx, [same, same], layout="repeat")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
