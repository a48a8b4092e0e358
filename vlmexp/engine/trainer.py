"""The fold's trainer: trl's `SFTTrainer` with the project's speed levers (cached vision features, bf16
LoRA inputs, causal-only attention, fused LoRA, background optimizer writes) and validation by
`EvalCallback`; its row collator; and `build_trainer`, which sets them up from the config for
`train.train_fold` (and the benches).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from trl import SFTTrainer

from vlmexp.config import Config
from vlmexp.engine import autobatch, buckets, speed
from vlmexp.engine.async_save import BackgroundWriter, cpu_copy
from vlmexp.engine.batching import stackable, trl_collator
from vlmexp.engine.callbacks import EvalCallback
from vlmexp.engine.causal_only import RIGHT_PADDED, right_padded, without_padding_mask
from vlmexp.engine.compile import dynamic_shapes
from vlmexp.engine.encode import Encoder
from vlmexp.engine.lora_fused import fused_lora
from vlmexp.engine.lora_inputs import no_input_cast, peft_layers
from vlmexp.engine.run_caches import RunCaches
from vlmexp.engine.train_args import sft_config
from vlmexp.engine.vision_cache import VisionFeatureCache
from vlmexp.launch import fsdp as fsdp_launch
from vlmexp.timing import phase


class _SFTTrainer(SFTTrainer):
    """trl's SFTTrainer, with cached vision features standing in for pixel_values (frozen tower), and
    validation by real accuracy/macro-F1 (EvalCallback) instead of an eval loss."""

    vision_cache: VisionFeatureCache | None = None
    encoder: Encoder | None = None
    evaluator: EvalCallback | None = None

    lora_bf16_inputs: bool = False  # speed.lora_bf16_inputs, set by build_trainer
    causal_only: bool = False  # speed.causal_only, set by build_trainer
    lora_fused: bool = False  # speed.lora_fused, set by build_trainer
    attention: Callable[[], AbstractContextManager] = nullcontext  # speed.attention_backends (build_trainer)
    _n_params: int | None = None  # the model's parameters without embeddings, for floating_point_ops
    _tuner_layers: tuple[int, list] | None = None  # (id(model), its peft layers): found once a fold
    _writer: BackgroundWriter | None = None  # checkpoints' optimizer files, written in the background

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Under bf16 autocast peft's LoRA layers copy every input to their weights' dtype (fp32), and
        # autocast copies it back to bf16 for lora_A's matmul: aten::copy_ was 22% of an eager 3B step's
        # kernel time (profile G, not all of it LoRA's); train_steps of a 3B demo run went 111 -> 98 s
        # without them (docs/performance.md, runs P and Q). lora_A gets the same bf16 input.
        # Forward, backward and any checkpoint recompute all run inside this step; validation, which
        # runs without autocast and needs the cast, runs outside it.
        # A right-padded batch (marked by RowCollator) runs without its padding mask: flash attention
        # instead of the memory-efficient kernel, same loss (engine/causal_only.py). LoRA's scaling
        # and add run in lora_B's GEMM (engine/lora_fused.py).
        causal = inputs.pop(RIGHT_PADDED, False) and self.causal_only
        with (
            no_input_cast(self._peft_layers(model), active=self.lora_bf16_inputs and autocasting(self)),
            self.attention(),
            without_padding_mask(model) if causal else nullcontext(),
            fused_lora(active=self.lora_fused),
        ):
            return super().training_step(model, inputs, num_items_in_batch)

    def _peft_layers(self, model) -> list:
        # A fold's model keeps its peft layers: found once, not at every step (engine/lora_inputs.py)
        if self._tuner_layers is None or self._tuner_layers[0] != id(model):
            self._tuner_layers = (id(model), peft_layers(model))
        return self._tuner_layers[1]

    def floating_point_ops(self, inputs) -> int:
        # transformers' count for `total_flos`, 6 x input tokens x parameters, walks every parameter of
        # the model (~800 on the 3B) at every step: ~3 s of a 3B demo run's py-spy profile (run T).
        # The parameter count does not change during training: counted once, the same number.
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if ids is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._n_params is None:
            self._n_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * ids.numel() * self._n_params

    def _save_checkpoint(self, model, trial):
        with phase("checkpoint"):
            self._wait_for_saves()  # the previous checkpoint's optimizer file first, then rotation
            return super()._save_checkpoint(model, trial)

    def _save_optimizer_and_scheduler(self, output_dir):
        # The optimizer state written in a background thread (engine/async_save.py); FSDP and DeepSpeed
        # keep transformers' own writers.
        if not self.args.should_save or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        self._writer = self._writer or BackgroundWriter()
        self._writer.save(cpu_copy(self.optimizer.state_dict()), Path(output_dir) / OPTIMIZER_NAME)
        torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _wait_for_saves(self) -> None:
        if self._writer is not None:
            self._writer.wait()

    def train(self, *args, **kwargs):
        try:
            out = super().train(*args, **kwargs)
        except BaseException:
            if self._writer is not None:  # the training error is the one to see, not a write's after it
                with contextlib.suppress(Exception):
                    self._writer.wait()
            raise
        if self._writer is not None and self._writer.pending:
            with phase("checkpoint"):
                self._writer.wait()  # every checkpoint complete on disk before the fold goes on
        return out

    def _load_best_model(self):
        with phase("checkpoint"):
            self._wait_for_saves()
            return super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keys, index = inputs.pop("image_keys", None), inputs.pop("pixel_index", None)
        if self.vision_cache is not None and keys:
            inputs = self.vision_cache.fill(model, inputs, keys, index, self.encoder)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        metrics = self.evaluator.metrics(self.model, step=self.state.global_step)
        value = metrics[f"eval_{self.args.metric_for_best_model}"]
        metrics["eval_best"] = max(
            value, self.state.best_metric if self.state.best_metric is not None else value
        )
        # transformers' own log, not trl's: trl's would fold the training-step averages it has gathered
        # since the last loss log (entropy, token accuracy) into this entry.
        Trainer.log(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics


def autocasting(trainer) -> bool:
    """Whether the trainer's forward runs under low-precision autocast (accelerate's native AMP with
    train.bf16 on a GPU): only then may LoRA layers skip their input cast."""
    acc = getattr(trainer, "accelerator", None)
    return bool(acc is not None and acc.native_amp and acc.mixed_precision in ("bf16", "fp16"))


def build_trainer(
    cfg: Config,
    model,
    processor,
    examples: list[dict],
    output_dir: Path,
    callbacks=(),
    vision_patch: bool = True,
    caches: RunCaches | None = None,
    *,
    evaluator: EvalCallback | None = None,
    run_name: str | None = None,
    group: str = "",
) -> SFTTrainer:
    """trl's SFTTrainer with the project's settings and speed levers (measured in docs/performance.md):
    rows encoded once and padded per batch (speed.encode_once), a frozen vision tower's features once
    per image (speed.vision_cache), gradient checkpointing only when activations would not fit
    (train.gradient_checkpointing=auto, decided here for every fold: it depends on the fold's batch
    shape), trl 1.16's own answer-only LM head, and on CUDA the model's speed levers (`speed.prepare`:
    batched vision window attention, vision tower levers, compiled decoder layers), applied once per
    base model, so a base shared by the folds is prepared at the first fold only (`vision_patch=False`
    keeps the stock window loop, for the bench).
    `run_name`/`group`: a fold's tracker run, which also turns on checkpoints (sft_config);
    `evaluator`: the fold's EvalCallback (also in `callbacks`), which the trainer's `evaluate` asks."""
    caches = caches if caches is not None else RunCaches.for_run(cfg, processor)
    caches.bind(model)
    cuda = speed.on_cuda(model)
    # Static compiled shapes want few batch shapes (bucket widths, short batches filled); dynamic
    # ones take each batch as it is.
    static_shapes = speed.compiles(model, cfg) and not dynamic_shapes(cfg)
    auto_gc = cuda and cfg.train.gradient_checkpointing == "auto"
    auto_batch = cuda and cfg.train.batch_size == "auto"
    probe = auto_gc or auto_batch
    shape = _probe_shape(cfg, processor, examples, encoder=caches.encoder) if probe else None
    cfg = autobatch.resolve(cfg, model, shape)  # train.batch_size=auto: a number, lr per train.lr_rule
    speed.prepare(model, cfg, vision_patch=vision_patch)  # once per base model: later calls change nothing
    vision = caches.vision_for(model)
    args = sft_config(
        cfg, output_dir, model, shape=shape, run_name=run_name, group=group, evaluating=evaluator is not None
    )
    trainer = _SFTTrainer(
        model=model,
        args=args,
        # Rows are indices into `examples`; the collator builds the tensors.
        train_dataset=Dataset.from_dict({"row": list(range(len(examples)))}),
        data_collator=RowCollator(
            examples,
            caches.encoder,
            vision,
            cfg.train.max_length,
            processor,
            multiple=buckets.bucket_width if static_shapes else 1,
            fill_to=cfg.train.batch_size if static_shapes else 0,
        ),
        processing_class=processor,
        callbacks=list(callbacks),
    )
    trainer.vision_cache, trainer.encoder, trainer.evaluator = vision, caches.encoder, evaluator
    trainer.lora_bf16_inputs = cfg.speed.lora_bf16_inputs
    trainer.causal_only = cfg.speed.causal_only
    # FSDP folds keep peft's forward: the fused one reads lora_B's weight outside its module call,
    # which no sharded run has been tested with
    trainer.lora_fused = cfg.speed.lora_fused and not fsdp_launch.in_sharded_fold()
    trainer.attention = functools.partial(speed.attention_backends, cfg)
    return trainer


def _probe_shape(
    cfg: Config, processor, examples: list[dict], n: int = 32, encoder: Encoder | None = None
) -> tuple[int, int]:
    """(tokens, vision patches) of the largest of the first `n` rows, for the checkpointing decision.
    Qwen2.5-VL at 448 px with a 300-token prompt: (570, 1024). With the run's `encoder` the rows are
    its training encodings, which the fold's first batches then reuse; without it, processor calls
    made only for this (32 a fold: about 2 s of a 3B demo run's profile, run T)."""
    tokens = patches = 0
    image_token = getattr(processor, "image_token_id", None)
    for row in examples[:n]:
        if encoder is not None:
            kept = encoder.train_row(row)  # one row, no batch dim: input_ids (tokens,)
            enc = {"input_ids": kept["input_ids"][None]}
            if "image_grid_thw" in kept:
                enc["image_grid_thw"] = kept["image_grid_thw"]
        else:
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


class RowCollator:
    """Batches of training rows (dataset items {"row": i} index `examples`): padded from the rows'
    single encodings (`encode.Encoder`), or trl's collator on the raw rows when encode_once is off or
    the rows' media do not stack (e.g. SmolVLM rows with different image counts). Fails loud when a row
    has no supervised token left: its prompt alone exceeds max_length."""

    def __init__(
        self, examples, encoder: Encoder | None, vision, max_length: int, processor, multiple=1, fill_to=0
    ):
        self.examples, self.encoder, self.vision, self.max_length = examples, encoder, vision, max_length
        self.multiple = multiple  # pad widths to this many tokens (speed.compile: few distinct shapes)
        self.fill_to = fill_to  # short batches topped up to this many rows, label-masked (speed.compile)
        self.plain = encoder.collator if encoder is not None else trl_collator(processor, max_length)

    def __call__(self, items: list[dict]) -> dict:
        examples = [self.examples[int(it["row"])] for it in items]
        batch = None
        if self.encoder is not None:
            rows = [self.encoder.train_row(ex) for ex in examples]
            if stackable(rows):
                cached = self.vision.keys() if self.vision is not None else frozenset()
                rows = buckets.fill_rows(rows, self.fill_to)
                batch = self.encoder.pad_train(rows, skip_pixels=cached, multiple=self.multiple)
        if batch is None:
            batch = self.plain([dict(ex, images=list(ex["images"])) for ex in examples])
        batch[RIGHT_PADDED] = right_padded(batch.get("attention_mask"))  # on the CPU: no GPU wait
        empty = (batch["labels"][: len(examples)] != -100).sum(-1) == 0  # fill rows are masked on purpose
        if bool(empty.any()):
            raise ValueError(
                f"{int(empty.sum())} training sample(s) are longer than train.max_length={self.max_length} "
                "tokens before their answer starts, so nothing would be learned from them (and image tokens "
                "would be cut). Raise train.max_length, or shrink images (image.max_pixels / longest_side)."
            )
        return batch
