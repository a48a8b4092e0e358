"""One fold's supervised fine-tuning with trl's `SFTTrainer`.

Data goes to trl as prompt-completion rows, {"prompt", "completion", "images"}, built from the
model's own chat template (`samples.to_prompt_completion`): the prompt is the chat up to the
generation prompt, the completion `lead + answer + eot`, e.g. "red<|im_end|>". trl's VLM collator
then supervises only the completion tokens (completion_only_loss), for any chat template. (trl's
other route, messages + assistant_only_loss, needs a template trl recognises or one with
{% generation %} markers, and includes whatever the template puts after the end-of-turn token.)
The completion is tokenised on its own, exactly as `predict` scores it.

Validation accuracy/macro-F1 come from `predict` on the fold's validation samples (EvalCallback);
the best epoch's weights are put back into the model and saved to `out_dir/adapter`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

from vlmexp.config import Config
from vlmexp.engine import fast
from vlmexp.engine.callbacks import EvalCallback, LogRelay, load_trainable_state
from vlmexp.engine.encode import Encoder, RunCaches, stackable, trl_collator
from vlmexp.engine.samples import load_images, to_prompt_completion
from vlmexp.timing import phase

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path  # LoRA adapter (or the full model for finetune=full) + processor
    log_history: list[dict] = field(default_factory=list)  # trainer logs and val evaluations
    best_metric: float | None = None  # best validation cfg.metric; None when eval is off
    best_epoch: float | None = None  # epoch whose weights were saved
    train_seconds: float = 0.0


def train_fold(
    cfg: Config,
    model,
    processor,
    train_samples: list[dict],
    val_samples: list[dict],
    labels: list[str],
    out_dir: Path,
    on_log=None,
    caches: RunCaches | None = None,
) -> TrainResult:
    """Fine-tune `model` (already LoRA-wrapped for finetune=lora) and save it to out_dir/adapter.
    `caches` carries the run's encoded rows and vision features across folds (recipe: one per run)."""
    if not train_samples:
        raise ValueError("train_fold got no training samples")
    out_dir = Path(out_dir)
    caches = caches if caches is not None else RunCaches.for_run(cfg, processor)
    examples = training_dataset(cfg, processor, train_samples)
    callbacks = []
    evaluator = None
    if cfg.train.eval and val_samples:
        evaluator = EvalCallback(cfg, processor, val_samples, labels, on_log=on_log, caches=caches)
        callbacks.append(evaluator)
    elif cfg.train.eval:
        log.warning("train.eval is on but the fold has no validation samples: keeping the final weights")
    if on_log is not None:
        callbacks.append(LogRelay(on_log))
    trainer = build_trainer(cfg, model, processor, examples, out_dir / "trainer", callbacks, caches=caches)
    if on_log is not None:
        # the caller draws its own progress from on_log; the trainer's printed dicts would garble it
        trainer.remove_callback(PrinterCallback)
    t0 = time.time()
    with phase("train_steps"):
        trainer.train()
    seconds = time.time() - t0

    best_metric = best_epoch = None
    if evaluator is not None and evaluator.best_state is not None:
        load_trainable_state(model, evaluator.best_state)
        best_metric, best_epoch = evaluator.best_metric, evaluator.best_epoch
        log.info("best epoch %.2f: val %s %.4f", best_epoch, cfg.metric, best_metric)
    else:
        best_epoch = float(trainer.state.epoch or cfg.train.epochs)
    adapter_dir = out_dir / "adapter"
    with phase("save"):
        model.save_pretrained(adapter_dir)
        processor.save_pretrained(adapter_dir)
    model.eval()
    return TrainResult(
        adapter_dir=adapter_dir,
        log_history=list(trainer.state.log_history),
        best_metric=best_metric,
        best_epoch=best_epoch,
        train_seconds=round(seconds, 2),
    )


def training_dataset(cfg: Config, processor, train_samples: list[dict]) -> list[dict]:
    """Prompt-completion rows {"prompt", "completion", "images"} of the competition samples, plus the
    mixed-in general samples. Kept in memory as they are: a `datasets` table would store every image
    as PNG and decode it again at every step."""
    rows = [to_prompt_completion(processor, s) for s in train_samples]
    if cfg.train.mix_dataset and cfg.train.mix_ratio > 0:
        mixed = mix_samples(cfg, len(train_samples))
        rows += [to_prompt_completion(processor, s) for s in mixed]
        log.info("mixed in %d general samples from %s", len(mixed), cfg.train.mix_dataset)
    return rows


class _SFTTrainer(SFTTrainer):
    """trl's SFTTrainer, with cached vision features standing in for pixel_values (frozen tower)."""

    vision_cache: fast.VisionFeatureCache | None = None
    encoder: Encoder | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keys, index = inputs.pop("image_keys", None), inputs.pop("pixel_index", ())
        if self.vision_cache is not None and keys:
            pixels = inputs.pop("pixel_values", None)
            mm = self.vision_cache.features(model, keys, inputs["image_grid_thw"], pixels, index)
            inputs["mm_encoder_outputs"] = mm
            if self.encoder is not None:
                self.encoder.forget_pixels(k for k in keys if k in self.vision_cache)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def build_trainer(
    cfg: Config,
    model,
    processor,
    examples: list[dict],
    output_dir: Path,
    callbacks=(),
    vision_patch: bool = True,
    caches: RunCaches | None = None,
) -> SFTTrainer:
    """trl's SFTTrainer with the project's settings and speed levers (measured in docs/performance.md):
    rows encoded once and padded per batch (speed.encode_once), a frozen vision tower's features once
    per image (speed.vision_cache), gradient checkpointing only when activations would not fit
    (train.gradient_checkpointing=auto), the batched vision window attention on CUDA (`vision_patch=False`
    keeps the stock loop, for the bench), and trl 1.16's own answer-only LM head."""
    caches = caches if caches is not None else RunCaches.for_run(cfg, processor)
    caches.bind(model)
    cuda = _on_cuda(model)
    auto_gc = cuda and cfg.train.gradient_checkpointing == "auto"
    shape = _probe_shape(cfg, processor, examples) if auto_gc else None
    if vision_patch and cuda:
        fast.patch_vision_attention(model)
    if cfg.speed.compile and cuda:
        fast.compile_blocks(model)
    vision = caches.vision_for(model)
    trainer = _SFTTrainer(
        model=model,
        args=sft_config(cfg, output_dir, model, shape=shape),
        # Rows are indices into `examples`; the collator builds the tensors.
        train_dataset=Dataset.from_dict({"row": list(range(len(examples)))}),
        data_collator=RowCollator(
            examples,
            caches.encoder,
            vision,
            cfg.train.max_length,
            processor,
            multiple=fast.COMPILE_PAD_MULTIPLE if cfg.speed.compile and cuda else 1,
        ),
        processing_class=processor,
        callbacks=list(callbacks),
    )
    trainer.vision_cache, trainer.encoder = vision, caches.encoder
    return trainer


def _on_cuda(model) -> bool:
    return torch.cuda.is_available() and next(model.parameters()).is_cuda


def _probe_shape(cfg: Config, processor, examples: list[dict], n: int = 32) -> tuple[int, int]:
    """(tokens, vision patches) of the largest of the first `n` rows, for the checkpointing decision.
    Qwen2.5-VL at 448 px with a 300-token prompt: (570, 1024)."""
    tokens = patches = 0
    image_token = getattr(processor, "image_token_id", None)
    for row in examples[:n]:
        enc = processor(
            text=[row["prompt"] + row["completion"]],
            images=[row["images"]] if row["images"] else None,
            return_tensors="pt",
            add_special_tokens=False,
        )
        tokens = max(tokens, enc["input_ids"].shape[1])
        if "image_grid_thw" in enc:
            patches = max(patches, int(enc["image_grid_thw"].prod(-1).sum()))
        elif image_token is not None:  # LLaVA, SmolVLM: one placeholder per (merged) patch
            patches = max(patches, int((enc["input_ids"] == image_token).sum()))
    return min(tokens, cfg.train.max_length), patches


# transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns; gone in v6).
_SFT_FIELDS = {f.name for f in fields(SFTConfig)}
_CHECKPOINTING = (
    "activation_checkpointing" if "activation_checkpointing" in _SFT_FIELDS else "gradient_checkpointing"
)


def sft_config(cfg: Config, output_dir: Path, model, shape: tuple[int, int] | None = None) -> SFTConfig:
    """TrainConfig -> SFTConfig; CPU-safe (trl's defaults, bf16 and checkpointing, fail there).
    `shape`: (tokens, vision patches) per sample, for train.gradient_checkpointing=auto on a GPU;
    without it the estimate assumes train.max_length tokens."""
    t = cfg.train
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise ValueError(f"train.warmup_ratio={t.warmup_ratio} is a share of the steps in [0, 1), e.g. 0.05")
    cuda = torch.cuda.is_available()
    bf16 = {"on": True, "off": False, "auto": cuda and torch.cuda.is_bf16_supported()}[t.bf16]
    # Checkpointing cuts activation memory but costs 1.75x time (3B, batch 8: 19.1 vs 33.6 samples/s):
    # auto turns it on only when the estimated step would not fit in the GPU's free memory.
    tokens, patches = shape or (t.max_length, 0)
    checkpointing, why = fast.gradient_checkpointing_needed(
        t.gradient_checkpointing, model, t.batch_size, tokens, patches
    )
    log.info("gradient checkpointing %s (%s)", "on" if checkpointing else "off", why)
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a share of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=bf16 and cuda,
        tf32=t.tf32 if cuda else None,
        **{_CHECKPOINTING: checkpointing and cuda},
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=t.max_length,
        logging_steps=t.logging_steps,
        completion_only_loss=True,
        # The dataset holds row indices only; RowCollator builds the tensors, so trl prepares nothing.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        # Validation runs through EvalCallback (real accuracy), and the best weights are kept in memory.
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if cuda and torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        # One process trains one fold on one GPU (folds go parallel through `gpus=N`, one process per
        # GPU); with 2 GPUs visible trl refuses to start ("does not support nn.DataParallel"), as seen
        # on 2 H200s with gpus=1. Resolve the devices first, then pin the count, as HF examples do.
        _ = args.n_gpu
        args._n_gpu = 1
    return args


class RowCollator:
    """Batches of training rows (dataset items {"row": i} index `examples`): padded from the rows'
    single encodings (`encode.Encoder`), or trl's collator on the raw rows when encode_once is off or
    the rows' media do not stack (e.g. SmolVLM rows with different image counts). Fails loud when a row
    has no supervised token left: its prompt alone exceeds max_length."""

    def __init__(self, examples, encoder: Encoder | None, vision, max_length: int, processor, multiple=1):
        self.examples, self.encoder, self.vision, self.max_length = examples, encoder, vision, max_length
        self.multiple = multiple  # pad widths to this many tokens (speed.compile: few distinct shapes)
        self.plain = encoder.collator if encoder is not None else trl_collator(processor, max_length)

    def __call__(self, items: list[dict]) -> dict:
        examples = [self.examples[int(it["row"])] for it in items]
        batch = None
        if self.encoder is not None:
            rows = [self.encoder.train_row(ex) for ex in examples]
            if stackable(rows):
                cached = self.vision.keys() if self.vision is not None else frozenset()
                batch = self.encoder.pad_train(rows, skip_pixels=cached, multiple=self.multiple)
        if batch is None:
            batch = self.plain([dict(ex, images=list(ex["images"])) for ex in examples])
        empty = (batch["labels"] != -100).sum(-1) == 0
        if bool(empty.any()):
            raise ValueError(
                f"{int(empty.sum())} training sample(s) are longer than train.max_length={self.max_length} "
                "tokens before their answer starts, so nothing would be learned from them (and image tokens "
                "would be cut). Raise train.max_length, or shrink images (image.max_pixels / longest_side)."
            )
        return batch


def mix_samples(cfg: Config, n_competition: int) -> list[dict]:
    """`round(mix_ratio * n)` general chat samples from `train.mix_dataset`, chosen by `seed`.

    The file is JSONL, one {"messages": [...], "images": ["a.png", ...]} per line (images optional,
    relative to the file's folder); the final assistant message is what is learned.
    """
    path = Path(cfg.train.mix_dataset)
    if not path.is_file():
        raise FileNotFoundError(f"train.mix_dataset={path}: no such file (JSONL of {{'messages': [...]}})")
    pool = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not pool:
        raise ValueError(f"train.mix_dataset={path} is empty")
    n = round(cfg.train.mix_ratio * n_competition)
    rng = random.Random(cfg.seed)
    # Without replacement while the pool lasts, then whole extra passes over it.
    picks = [i for _ in range(math.ceil(n / len(pool))) for i in rng.sample(range(len(pool)), len(pool))][:n]
    return [_mix_sample(pool[i], i, path, cfg) for i in picks]


def _mix_sample(record: dict, line: int, path: Path, cfg: Config) -> dict:
    messages = record.get("messages")
    where = f"{path} line {line + 1}"
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: needs 'messages' ending with an assistant message")
    paths = [str(p if Path(p).is_absolute() else path.parent / p) for p in record.get("images") or []]
    images = [img for p in paths for img in load_images(p, cfg)]
    return {"id": f"mix:{line}", "images": images, "messages": _structured(messages, len(images), where)}


def _structured(messages: list[dict], n_images: int, where: str) -> list[dict]:
    """String contents -> [{"type": "text"}] parts; images go before the first user text if unplaced."""
    out = []
    for m in messages:
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        out.append({"role": m["role"], "content": parts})
    placed = sum(p.get("type") == "image" for m in out for p in m["content"])
    if placed == 0 and n_images:
        first_user = next(m for m in out if m["role"] == "user")
        first_user["content"] = [{"type": "image"}] * n_images + first_user["content"]
    elif placed != n_images:
        raise ValueError(f"{where}: {placed} image slots in the messages but {n_images} images listed")
    return out
