"""Label probabilities for samples: score every label's likelihood, or generate and parse.

`mode=score` (default): for each image, the prompt (and, for reason/CoT variants, the reasoning the
model first generates up to the marker, e.g. "Reason: red tag.\\nLabel:") is encoded once, then
only the candidates' own tokens (label + end of turn, e.g. "red<|im_end|>") run over its KV cache,
all candidates in one more forward (`engine/scoring.py`). Softmax over the candidates' summed
log-likelihoods gives one probability per class, so there are no parse failures.

`mode=generate`: greedy decoding, parsed with `parse_answer`; the parsed label gets probability 1,
an unparseable answer gets pred None and all-zero probabilities, and the failures are counted.

The text layout is exactly the one training used (`samples.split_turn`): prompt, then the
completion `lead + answer + eot` tokenised on its own, as trl's prompt-completion collator does.

With the run's caches, new images first go through the frozen tower in calls of one image size (the
vision pre-pass), and scoring batches are pipelined: batch i+1 is built on the CPU and queued while the
GPU computes batch i, whose scores are read only then (`_score_rows`, `scoring.score_candidates`
queues its work without a host sync).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from vlmexp.config import Config
from vlmexp.engine import speed, vision_prepass
from vlmexp.engine.batching import append_left_padded, stackable
from vlmexp.engine.compile import eager_blocks
from vlmexp.engine.lora_inputs import no_input_cast, peft_layers
from vlmexp.engine.lora_merge import merged_lora
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.samples import Turn, prompt_messages, split_turn
from vlmexp.engine.scoring import score_candidates
from vlmexp.engine.transfer import tensors_to
from vlmexp.engine.vision_prepass import grid_guess
from vlmexp.models.parts import unwrap
from vlmexp.prompts.render import parse_answer
from vlmexp.tables import prob_columns

log = logging.getLogger(__name__)


def predict(
    cfg: Config,
    model,
    processor,
    samples: list[dict],
    labels: list[str],
    *,
    progress: bool = True,
    caches: RunCaches | None = None,
):
    """DataFrame with id, pred, p:<label> per class (class order), and raw (generated text) if any.
    `caches`: the run's encoded prompts and vision features (scoring only), shared by every fold."""
    if not samples:
        raise ValueError("predict() got no samples")
    model.eval()
    speed.prepare(model, cfg)  # CUDA levers, same features and scores; a no-op on a prepared base
    if cfg.model.head == "cls":  # the head's softmax in one forward; no label tokens scored
        from vlmexp.engine.cls_head import predict_head

        return predict_head(cfg, model, processor, samples, labels)
    mode = cfg.predict.mode
    if caches is not None:
        caches.bind(model)
        if mode == "score":  # the tower over the new images first, in calls of one image size
            images = [img for s in samples for img in s["images"]]
            vision_prepass.prepass(cfg, caches, model, processor, images, training=False, progress=progress)
    encoder = caches.encoder if caches is not None else None
    # Each prompt's layout is rendered once per run (two chat-template renders) when the run caches it.
    turn_of = encoder.turn if encoder is not None else functools.partial(split_turn, processor)
    rows: list[dict] = []
    low = low_precision(model) if cfg.speed.predict_autocast else nullcontext()
    # speed.compile's layers serve training; forwards with a KV cache recompile per layer (compile.py).
    # The merged weights are made outside inference mode: they become parameters for the pass.
    with (
        merged_lora(model, enabled=cfg.speed.predict_merge, samples=len(samples)),
        torch.inference_mode(),
        low,
        speed.attention_backends(cfg),
        eager_blocks(model),
        Progress(disable=not progress, transient=True) as bar,
    ):
        task = bar.add_task(f"predict ({mode})", total=len(samples))
        all_turns = [turn_of(prompt_messages(s["messages"])) for s in samples]
        order = length_order(samples, all_turns, processor, encoder)
        # One batch in flight: a batch's scores are read (the host waits for the GPU) only once the next
        # batch is built and queued, so the CPU work of building it runs while the GPU computes.
        pending: tuple[Callable[[], list[dict]], int] | None = None
        for idx in _chunks(order, cfg.predict.batch_size):
            batch, turns = [samples[i] for i in idx], [all_turns[i] for i in idx]
            marker = batch[0]["rendered"].marker
            if mode == "generate":
                out = _generate_rows(cfg, model, processor, batch, turns, labels, marker)
                queued = (lambda out=out: out), len(batch)
            else:
                queued = _score_rows(cfg, model, processor, batch, turns, labels, marker, caches), len(batch)
            if pending is not None:
                rows += pending[0]()
                bar.advance(task, pending[1])
            pending = queued
        if pending is not None:
            rows += pending[0]()
            bar.advance(task, pending[1])
    at = {i: pos for pos, i in enumerate(order)}
    df = pd.DataFrame([rows[at[i]] for i in range(len(samples))])  # back in the samples' order
    if mode == "generate":
        failures = int(df["pred"].isna().sum())
        if failures:
            example = df.loc[df["pred"].isna(), "raw"].iloc[0]
            log.warning(
                "%d of %d generated answers name no label (pred left empty, probabilities 0); e.g. %r",
                failures,
                len(df),
                example[-200:],
            )
    return df


@contextmanager
def low_precision(model) -> Iterator[None]:
    """A bf16 (or fp16) model's forward under autocast, as the trainer ran it, with its LoRA layers
    taking their inputs as they are. Without this, peft computes each LoRA delta in its fp32 weights'
    dtype: the input copied to fp32 and, for a 3B's gate/up projections, 17k tokens x 11008 fp32
    outputs (750 MB) scaled and added per layer, memory traffic that a bf16 delta does not have. The
    delta is then what training computed (bf16 matmuls, fp32 accumulation); the base layers' bf16
    matmuls are unchanged. A fp32 model (CPU runs) is left as it is."""
    dtype = unwrap(model).dtype
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=dtype), no_input_cast(peft_layers(model)):
        yield


def length_order(samples: list[dict], turns: list[Turn], processor, encoder=None) -> list[int]:
    """Sample indices, longest prompt first, so each batch holds prompts of about one length: a batch
    is padded to its longest row, and the demo's prompts (154-238 image tokens each, 20 image grids)
    in their own order padded 14% of the image tokens at batch 32, sorted 1%. Each row's scores do
    not depend on its batchmates (left padding is masked, positions explicit). The length is counted
    without encoding any image: the prompt's tokens (one batched tokenizer call) plus each image's
    patch grid guessed from its size (`vision_prepass.grid_guess`) over the processor's merge size
    squared (Qwen-VL's 2x2 merge). Longest first: a batch that does not fit in memory fails at once.
    `encoder`: the run's Encoder, whose token ids of each prompt serve every fold's call."""
    prompts = [t.prompt for t in turns]
    if encoder is not None:
        texts = encoder.token_ids(prompts)
    else:
        tokenizer = getattr(processor, "tokenizer", processor)
        texts = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    image_processor = getattr(processor, "image_processor", None)
    merge = getattr(image_processor, "merge_size", None) or 1

    def tokens(i: int) -> float:
        if image_processor is None:
            return len(texts[i])
        grids = [grid_guess(image_processor, img) for img in samples[i]["images"]]
        return len(texts[i]) + sum(h * w for h, w in grids) / merge**2

    return sorted(range(len(samples)), key=lambda i: -tokens(i))


def _chunks(items: list, size: int) -> Iterator[list]:
    size = max(1, size)
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _row(sample_id: str, pred: str | None, probs: np.ndarray, labels: list[str], raw: str | None) -> dict:
    row = {"id": sample_id, "pred": pred, **dict(zip(prob_columns(labels), probs.tolist(), strict=True))}
    if raw is not None:
        row["raw"] = raw
    return row


# -- scoring ---------------------------------------------------------------------------------------


def _score_rows(
    cfg, model, processor, batch, turns: list[Turn], labels, marker: str, caches=None
) -> Callable[[], list[dict]]:
    """Queues the batch's scoring on the model's device and returns what reads its rows: on a GPU the
    scores are still being computed when this returns (`_on_host`)."""
    raws: list[str | None] = [None] * len(batch)
    prefixes = [t.lead for t in turns]
    if marker:
        # Reason/CoT variants: the label follows the model's own reasoning, so generate that first.
        texts = _generate(cfg, model, processor, batch, turns, stop=marker.rstrip())
        raws = texts
        prefixes = [_cut_at_marker(text, marker, t.lead) for text, t in zip(texts, turns, strict=True)]
    completions = [[p + label + t.eot for label in labels] for p, t in zip(prefixes, turns, strict=True)]
    logliks = score_completions(
        model, processor, [t.prompt for t in turns], _images(batch), completions, caches, on_device=True
    )
    read = _on_host(logliks)

    def rows() -> list[dict]:
        probs = torch.softmax(read(), dim=-1).numpy()
        return [
            _row(sample["id"], labels[int(p.argmax())], p, labels, raw)
            for sample, p, raw in zip(batch, probs, raws, strict=True)
        ]

    return rows


def _on_host(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """What gives `t` on the CPU once it is computed: a GPU tensor's copy is queued now, behind the work
    that computes it, and read after waiting for that work alone (a CUDA event), not for what was queued
    after it; a CPU tensor is returned as it is."""
    if t.device.type != "cuda":
        return lambda: t
    host = t.to("cpu", non_blocking=True)  # into page-locked memory, filled when the stream gets there
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))  # the tensor's GPU, not necessarily the current one

    def read() -> torch.Tensor:
        done.synchronize()
        return host

    return read


THINK_END = "</think>"  # Qwen3 / Qwen3.5 thinking checkpoints close their thought with this


def after_think(text: str) -> str:
    """The answer after a closed think block, e.g. "<think>red or blue?</think>\n\nblue" -> "\n\nblue";
    text without one as it is."""
    at = text.rfind(THINK_END)
    return text[at + len(THINK_END) :] if at >= 0 else text


def _cut_at_marker(text: str, marker: str, lead: str) -> str:
    """Generated reasoning up to and including the marker; the marker is added if the model forgot it.
    The marker is looked for after a think block if the model wrote one (a thinking checkpoint may,
    even after the empty block of the non-thinking prompt): "<think>Label: red?</think>Reason: ..."
    must not be cut inside the thought."""
    think_end = text.rfind(THINK_END)
    at = text.find(marker.rstrip(), think_end + len(THINK_END) if think_end >= 0 else 0)
    if at >= 0:
        return text[:at] + marker
    # No marker within max_new_tokens: score the labels after what it wrote, on a new line.
    body = text.rstrip()
    return (body + "\n" + marker) if body.strip() else lead + marker


def score_completions(
    model,
    processor,
    prompts: list[str],
    images: list[list],
    completions: list[list[str]],
    caches: RunCaches | None = None,
    on_device: bool = False,
) -> torch.Tensor:
    """Log-likelihood (B, n) of each of the n completions of each prompt (on the model's device, still
    being computed, with `on_device`: see `scoring.score_candidates`).

    Each completion is tokenised on its own (as in training). Tokens all n completions of a
    prompt share (e.g. "Reason: red tag.\\nLabel:") join the prompt; the prompt and image are
    encoded ONCE, and the candidates' remaining tokens all run over its KV cache (engine/scoring.py).
    Shared tokens have the same probability under every candidate and cancel in the softmax.
    With `caches`, each prompt is encoded once per run (`encode.Encoder`) and a frozen tower's image
    features come from the run's feature cache.
    """
    tok = processor.tokenizer
    encoder = caches.encoder if caches is not None else None
    flat = [c for cands in completions for c in cands]
    # One batched tokenizer call for all distinct texts (25 labels x 32 prompts = 800 calls otherwise).
    if encoder is not None:
        flat_ids = encoder.token_ids(flat)
    else:
        distinct = sorted(set(flat))
        by_text = dict(zip(distinct, tok(distinct, add_special_tokens=False)["input_ids"], strict=True))
        flat_ids = [by_text[c] for c in flat]
    it = iter(flat_ids)
    ids = [[next(it) for _ in cands] for cands in completions]
    n = len(ids[0])
    if any(len(cands) != n for cands in ids):
        raise ValueError("every prompt needs the same number of candidate completions")
    shared = [_common_prefix(cands) for cands in ids]
    extra = [cands[0][:k] for cands, k in zip(ids, shared, strict=True)]
    ctx, unpadded = _context(model, processor, prompts, images, extra, caches)
    suffixes = [[c[k:] for c in cands] for cands, k in zip(ids, shared, strict=True)]
    return score_candidates(
        model, ctx, suffixes, pad_id=tok.pad_token_id, on_device=on_device, unpadded=unpadded
    )


def _context(model, processor, prompts, images, extra, caches: RunCaches | None) -> tuple[dict, bool]:
    """The left-padded prompts + `extra` ids on the model's device: from the run's encoded rows and
    cached vision features when `caches` has them, else straight from the processor; and whether no row
    is padded, seen on the CPU before the move (`score_candidates(unpadded=...)`)."""
    encoder = caches.encoder if caches is not None else None
    rows = encoder.prompt_rows(prompts, images, extra) if encoder else None
    if not rows or not stackable(rows):
        enc = _encode(processor, prompts, images, extra=extra)
        return tensors_to(enc, model.device), bool(enc["attention_mask"].all())
    vision = caches.vision_for(model, training=False)
    skip = vision.keys() if vision is not None else frozenset()
    ctx = encoder.pad_prompts(rows, skip_pixels=skip)
    keys, index = ctx.pop("image_keys"), ctx.pop("pixel_index", None)
    unpadded = bool(ctx["attention_mask"].all())
    ctx = tensors_to(ctx, model.device)
    if vision is not None and keys:
        ctx = vision.fill(model, ctx, keys, index, encoder)
    return ctx, unpadded


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all `seqs` share, leaving every one at least one token."""
    k = 0
    shortest = min(len(s) for s in seqs)
    while k < shortest - 1 and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


def _images(batch: list[dict]) -> list[list]:
    return [list(s["images"]) for s in batch]


def _encode(processor, prompts: list[str], images: list[list], extra: list[list[int]] | None = None) -> dict:
    """Processor output for left-padded prompts, with `extra` token ids appended to each row."""
    # add_special_tokens=False: the chat template already wrote BOS where the model wants one;
    # trl's collator tokenises the same way, so training and prediction see the same ids.
    has_images = any(images)
    enc = processor(
        text=prompts,
        images=images if has_images else None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=False,
    )
    enc = dict(enc)
    if extra and any(extra):
        enc = append_left_padded(enc, extra, processor.tokenizer.pad_token_id)
    return enc


# -- generation ------------------------------------------------------------------------------------


def _generate(cfg, model, processor, batch, turns: list[Turn], stop: str | None = None) -> list[str]:
    """Greedy continuations of the prompts (left-padded batch), decoded without special tokens."""
    tok = processor.tokenizer
    enc = _encode(processor, [t.prompt for t in turns], _images(batch))
    enc = {k: v.to(model.device) for k, v in enc.items()}
    # Stop at the template's end-of-turn token (e.g. <|im_end|>) as well as at the tokenizer's EOS.
    eos = {tok.eos_token_id} - {None}
    for eot in {t.eot for t in turns}:
        ids = tok(eot, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.add(ids[0])
    eos = sorted(eos)
    kwargs = {"stop_strings": [stop], "tokenizer": tok} if stop else {}
    out = model.generate(
        **enc,
        max_new_tokens=cfg.predict.max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
        **kwargs,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    return tok.batch_decode(new, skip_special_tokens=True)


def _generate_rows(cfg, model, processor, batch, turns, labels, marker: str) -> list[dict]:
    texts = _generate(cfg, model, processor, batch, turns)
    out = []
    for sample, text in zip(batch, texts, strict=True):
        pred = parse_answer(after_think(text), labels, marker)
        probs = np.array([1.0 if label == pred else 0.0 for label in labels])
        out.append(_row(sample["id"], pred, probs, labels, text))
    return out
