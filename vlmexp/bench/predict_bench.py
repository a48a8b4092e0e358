"""Prediction speed: HF `generate` + parsing (the reference) against `exp run`'s `predict` (scoring).

The reference decodes as many tokens as the longest label answer (label + end-of-turn), the work a
trained model does before it stops; random weights never stop on their own, so min_new_tokens pins it.
The reference and the `plain` and `fresh` rows process every image and run the vision tower on it;
the `warm` row is the steady state of a K-fold run, where each fold re-predicts the same test images:
their encodings and vision features were computed by the first fold (vision features for Qwen-VL only:
Gemma 3 runs its tower inside forward, so its warm rows keep only the encodings).
"""

from __future__ import annotations

import time

import torch

from vlmexp import timing
from vlmexp.bench import profile
from vlmexp.bench.synth import candidate_ids, collate_prompts
from vlmexp.config import Config
from vlmexp.engine import speed
from vlmexp.engine.compile import uncompile_blocks
from vlmexp.engine.predict import predict
from vlmexp.engine.run_caches import RunCaches
from vlmexp.tables import prob_columns


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _batches(samples: list[dict], batch_size: int) -> list[list[dict]]:
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def _timed(fn, batches: list, warmup: int) -> tuple[float, list]:
    """Seconds for the batches after the first `warmup` ones, and every batch's output."""
    outs, t0 = [], time.perf_counter()
    for i, b in enumerate(batches):
        outs.append(fn(b))
        if i == warmup - 1:
            _sync()
            t0 = time.perf_counter()
    _sync()
    return time.perf_counter() - t0, outs


def _row(name: str, seconds: float, n_images: int, peak: bool = True, **extra) -> dict:
    gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and peak else None
    return {"path": name, "images_per_s": n_images / seconds, "peak_gib": gib, **extra}


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def generate_row(model, processor, samples, label_names, *, batch_size: int, warmup: int) -> dict:
    """Reference: processor -> generate (greedy) -> decode -> parse against the label list."""
    device = next(model.parameters()).device
    n_new = max(len(c) for c in candidate_ids(processor, label_names))
    batches = _batches(samples, batch_size)

    def step(chunk):
        inputs = _to(collate_prompts(processor, chunk), device)
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [t.strip() if t.strip() in label_names else None for t in texts]

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        seconds, outs = _timed(step, batches, warmup)
    n = sum(len(b) for b in batches[warmup:])
    parsed = sum(p is not None for o in outs for p in o)
    return _row("reference-generate", seconds, n, batch_size=batch_size, new_tokens=n_new, parsed=parsed)


MODES = {
    "plain": "project-predict, no run caches",
    "fresh": "project-predict, run caches empty (fold 1: every image new)",
    "warm": "project-predict, run caches warm (folds 2+: test images seen)",
    "warm-compile": "project-predict, run caches warm, speed.compile=true",
}


def score_row(
    model, processor, samples, label_names, *, batch_size: int, warmup: int, mode: str = "plain"
) -> tuple[dict, list]:
    """Project: `engine.predict.predict` (mode=score), the function `exp run` calls, once over the timed
    images after a warm-up call: prompts encoded, one prefill per image, all candidates on the shared KV
    cache. (Until run AL it was called once per batch, which showed neither its pipelined batches nor its
    tower pre-pass of new images.)

    `mode` is the state of the run's caches (`run_caches.RunCaches`): `plain` uses none (the processor and
    the vision tower run on every batch); `fresh` starts them empty, as a run's first fold predicting
    the test set; `warm` fills them with one untimed pass first, as every later fold finds them (each
    fold re-predicts the same test images with the same frozen tower)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    cfg = Config()
    cfg.predict.batch_size, cfg.predict.mode = batch_size, "score"
    cfg.speed.compile = mode == "warm-compile"
    if cfg.speed.compile:  # earlier rows prepared the model without compiling: predict prepares it anew
        speed.forget(model)
    caches = None
    if mode != "plain":
        caches = RunCaches.for_run(cfg, processor)
        caches.vision_trains = False  # the bench model trains nothing: its tower is frozen

    def call(chunk: list[dict]) -> torch.Tensor:
        table = predict(cfg, model, processor, chunk, label_names, progress=False, caches=caches)
        return torch.tensor(table[prob_columns(label_names)].to_numpy(dtype=float))

    # One predict() call over the timed images, as `exp run` predicts a whole test set: its batches are
    # pipelined (the next built while the GPU runs the last) and its new images go through the tower by
    # size first, neither of which a call per batch would show. The warm-up call's images are others
    # (at most half of them: 4 images at batch 4 warm up on 2 and time 2).
    cut = min(warmup * batch_size, len(samples) // 2)
    head, timed = samples[:cut], samples[cut:]
    if mode.startswith("warm"):
        call(samples)
    first = call(head)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    # Phases without a GPU wait at their boundaries (which would undo the pipelining): host seconds,
    # e.g. "encode" is the CPU building rows and waiting for the pre-pass's pixel workers.
    with timing.recording(sync=False) as timer:
        outs = [first, call(timed)]
        _sync()
    seconds, n = time.perf_counter() - t0, len(timed)
    if torch.cuda.is_available() and profile.enabled():
        if mode == "fresh":  # the row's caches are warm by now: empty ones, so every image is new again
            caches = RunCaches.for_run(cfg, processor)
            caches.vision_trains = False
        name = f"predict-{mode}-b{batch_size}"
        profile.profile_calls(name, call, [samples[: 2 * batch_size]], per_item=2 * batch_size)
    # warm caches skip the tower only where the feature cache serves the model (Qwen-VL, Gemma 3); where
    # it does not (Gemma 4, LLaVA, SmolVLM) the tower runs inside forward and warm rows pay for it
    served = caches is not None and caches.vision_for(model, training=False) is not None
    row = _row(
        MODES[mode],
        seconds,
        n,
        batch_size=batch_size,
        caches=mode,
        vision_cache=mode.startswith("warm") and served,
        host_phases_s=timer.report()["phases"],
    )
    if cfg.speed.compile:  # later rows run eagerly again
        uncompile_blocks(model)
        speed.forget(model)
    return row, outs
