"""One fold's supervised fine-tuning with trl's `SFTTrainer`, checkpointed so a killed fold resumes.

Data goes to trl as prompt-completion rows, {"prompt", "completion", "images"}, built from the
model's own chat template (`samples.to_prompt_completion`): the prompt is the chat up to the
generation prompt, the completion `lead + answer + eot`, e.g. "red<|im_end|>". trl's VLM collator
then supervises only the completion tokens (completion_only_loss), for any chat template. (trl's
other route, messages + assistant_only_loss, needs a template trl recognises or one with
{% generation %} markers, and includes whatever the template puts after the end-of-turn token.)
The completion is tokenised on its own, exactly as `predict` scores it.

Validation accuracy/macro-F1 come from `predict` on the fold's validation samples (EvalCallback),
logged through the trainer to every tracker (train.report_to) and to the fold's log.jsonl. The fold
checkpoints every epoch (or train.save_every steps) and after every evaluation but the last step's,
keeping the last and the best; a rerun after kill -9 resumes from the last (weights, optimizer,
scheduler, RNG, data order: the trainer's own resume_from_checkpoint). At the end the best weights
(in memory when the last step scored best, else its checkpoint) are saved as the fold's adapter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from transformers import PrinterCallback, Trainer
from transformers.integrations import TensorBoardCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from vlmexp.config import Config
from vlmexp.engine import autobatch, buckets, cls_head, speed
from vlmexp.engine.async_save import PENDING_SUFFIX, BackgroundWriter, cpu_copy
from vlmexp.engine.callbacks import EvalCallback, JsonlLog, LogRelay, SkipFinalSave, SkipRepeatedSave
from vlmexp.engine.causal_only import RIGHT_PADDED, right_padded, without_padding_mask
from vlmexp.engine.compile import dynamic_shapes
from vlmexp.engine.encode import Encoder, RunCaches, stackable, trl_collator
from vlmexp.engine.lora_fused import fused_lora
from vlmexp.engine.lora_inputs import no_input_cast, peft_layers
from vlmexp.engine.mix import mix_samples
from vlmexp.engine.samples import to_prompt_completion
from vlmexp.engine.train_args import sft_config
from vlmexp.engine.vision_cache import VisionFeatureCache
from vlmexp.launch import fsdp as fsdp_launch
from vlmexp.rundir import RunDir
from vlmexp.tables import read_json, write_json
from vlmexp.timing import phase

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path  # LoRA adapter (or the full model for finetune=full) + processor
    log_history: list[dict] = field(default_factory=list)  # trainer logs and val evaluations
    best_metric: float | None = None  # best validation cfg.metric; None when eval is off
    best_epoch: float | None = None  # epoch whose weights were saved
    train_seconds: float = 0.0
    resumed_from: str | None = None  # the checkpoint a rerun continued from, e.g. ".../checkpoint-6"
    batch_size: int | None = None  # rows per device step as trained, e.g. 24 for train.batch_size=auto
    lr: float | None = None  # the peak learning rate as trained, e.g. 3.46e-4 (auto's lr_rule applied)
    # The validation predictions of the kept weights (the best step's evaluation), not saved to JSON:
    # the recipe's OOF table when it predicts the validation rows as validation did (_validation_is_oof).
    val_table: pd.DataFrame | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FoldOutputs:
    """Where one fold's training writes: a run's fold (`for_fold`, the layout RunDir declares) or a bare
    folder (`under`, for tests and notebooks)."""

    adapter: Path  # the best (or last) weights + processor
    result: Path  # the TrainResult as JSON, written once the adapter is saved
    checkpoints: Path  # trainer checkpoints: the last and the best
    log: Path  # log.jsonl, one line per trainer log
    tensorboard: Path  # TensorBoard event files
    name: str  # the tracker run, e.g. "demo-1a2b3c4d-fold0"
    group: str  # the tracker group: the run, e.g. "demo-1a2b3c4d"

    @classmethod
    def for_fold(cls, run: RunDir, k: int) -> FoldOutputs:
        return cls(
            adapter=run.adapter_dir(k),
            result=run.train_result_path(k),
            checkpoints=run.checkpoint_dir(k),
            log=run.train_log_path(k),
            tensorboard=run.tensorboard_dir(k),
            name=f"{run.root.name}-fold{k}",
            group=run.root.name,
        )

    @classmethod
    def under(cls, out_dir: Path) -> FoldOutputs:
        d = Path(out_dir)
        files = (d / "adapter", d / "train_result.json", d / "checkpoints", d / "log.jsonl", d / "tb")
        return cls(*files, name=d.name, group=d.parent.name)


def train_fold(
    cfg: Config,
    model,
    processor,
    train_samples: list[dict],
    val_samples: list[dict],
    labels: list[str],
    out: Path | FoldOutputs,
    on_log=None,
    caches: RunCaches | None = None,
) -> TrainResult:
    """Fine-tune `model` (already LoRA-wrapped for finetune=lora) and save it to `out.adapter`; resume
    from `out.checkpoints` when an earlier process left one there, or load `out.adapter` into `model`
    when `out.result` says training finished. `out`: a FoldOutputs, or a folder to lay one out under.
    `caches` carries the run's encoded rows and vision features across folds."""
    if not train_samples:
        raise ValueError("train_fold got no training samples")
    out = out if isinstance(out, FoldOutputs) else FoldOutputs.under(out)
    caches = caches if caches is not None else RunCaches.for_run(cfg, processor)
    evaluator = None
    if cfg.train.eval and val_samples:
        evaluator = EvalCallback(cfg, processor, val_samples, labels, caches=caches)
    elif cfg.train.eval:
        log.warning("train.eval is on but the fold has no validation samples: keeping the final weights")
    callbacks = [
        evaluator,
        SkipRepeatedSave(),
        SkipFinalSave(),
        JsonlLog(out.log),
        LogRelay(on_log) if on_log else None,
    ]
    # model.head=cls: prompt-only rows and cross-entropy on a linear head (engine/cls_head.py)
    build = cls_head.trainer_builder(train_samples, labels) if cfg.model.head == "cls" else build_trainer
    trainer = build(
        cfg,
        model,
        processor,
        training_dataset(cfg, processor, train_samples) if cfg.model.head == "lm" else [],
        out.checkpoints,
        [c for c in callbacks if c is not None],
        caches=caches,
        evaluator=evaluator,
        run_name=out.name,
        group=out.group,
    )
    if on_log is not None:
        # the caller draws its own progress from on_log; the trainer's printed dicts would garble it
        trainer.remove_callback(PrinterCallback)
    if out.result.exists():
        # Trained before a kill (e.g. while predicting): the saved weights, not the epochs after the
        # best one trained again from its checkpoint.
        log.info("fold training finished before: reusing %s", out.adapter)
        trainer._load_from_checkpoint(str(out.adapter))  # the trainer's loader: adapter or full model
        model.eval()
        done = read_json(out.result)
        return TrainResult(**{**done, "adapter_dir": out.adapter})
    resume = last_checkpoint(out.checkpoints)
    if resume is not None:
        log.info("resuming fold training from %s", resume)
    _point_tensorboard(trainer, out.tensorboard, resume)
    t0 = time.time()
    with phase("train_steps"), _tracker_env(cfg, out):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - t0

    best_metric = best_epoch = val_table = None
    state = trainer.state
    if evaluator is not None and state.best_global_step:
        # The last step's weights are in memory and were not checkpointed (SkipFinalSave): load only an
        # earlier best, found by its folder name (the run folder may have moved since it was written).
        if state.best_global_step != state.global_step:
            state.best_model_checkpoint = str(out.checkpoints / f"checkpoint-{state.best_global_step}")
            trainer._load_best_model()  # the trainer's own loader: adapter, full model, FSDP or DeepSpeed
        best_metric = state.best_metric
        best_epoch = next(
            e["epoch"]
            for e in state.log_history
            if "eval_macro_f1" in e and e["step"] == state.best_global_step
        )
        log.info("best epoch %.2f: val %s %.4f", best_epoch, cfg.metric, best_metric)
        # None when that evaluation ran in an earlier, killed process (this one resumed after it)
        val_table = evaluator.tables.get(state.best_global_step)
    else:
        best_epoch = float(state.epoch or cfg.train.epochs)
    with phase("save"):
        if fsdp_launch.in_sharded_fold():
            trainer.save_model(str(out.adapter))  # gathers the sharded weights; rank 0 writes them
        else:
            model.save_pretrained(out.adapter)
            if cfg.model.head == "cls":
                cls_head.save_head(model, out.adapter)
        if fsdp_launch.is_main_process():
            processor.save_pretrained(out.adapter)
    model.eval()
    result = TrainResult(
        adapter_dir=out.adapter,
        log_history=list(state.log_history),
        best_metric=best_metric,
        best_epoch=best_epoch,
        train_seconds=round(seconds, 2),
        resumed_from=str(resume) if resume else None,
        batch_size=trainer.args.per_device_train_batch_size,
        lr=trainer.args.learning_rate,
        val_table=val_table,
    )
    if fsdp_launch.is_main_process():
        saved = {k: v for k, v in result.__dict__.items() if k != "val_table"}
        write_json({**saved, "adapter_dir": str(out.adapter)}, out.result)
    return result


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, e.g. checkpoint-12; None when there is none.

    A kill -9 while the trainer writes checkpoint-N leaves it without (or with half) its
    trainer_state.json, which the trainer writes after the weights, optimizer and RNG, or with the
    optimizer's `.tmp` file of the background write (engine/async_save.py): such a folder is removed,
    and the fold resumes from the one before it."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.rsplit("-", 1)[1].isdigit()),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )
    for ckpt in reversed(found):
        try:
            json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            if any(ckpt.glob(f"*{PENDING_SUFFIX}")):  # its optimizer file was still being written
                raise OSError("unfinished write")
            return ckpt
        except (OSError, json.JSONDecodeError):
            log.warning("removing %s: written only in part (killed while saving)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _point_tensorboard(trainer: Trainer, log_dir: Path, resume: Path | None) -> None:
    """TensorBoard events of the fold go to `log_dir`, e.g. runs/demo-1a2b3c4d/tb/fold0, so that
    `tensorboard --logdir runs` lists every run's folds. A resumed fold hides the events the killed
    process wrote after its checkpoint (they are logged again)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(log_dir)
            if resume is not None and trainer.is_world_process_zero():
                from torch.utils.tensorboard import SummaryWriter

                step = int(resume.name.rsplit("-", 1)[1])
                cb.tb_writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1)


@contextmanager
def _tracker_env(cfg: Config, out: FoldOutputs) -> Iterator[None]:
    """The fold's tracker run joins its run's group: wandb through WANDB_RUN_GROUP, mlflow through
    MLFLOW_TAGS (tensorboard by folder, trackio by project: sft_config). Set for this fold only, and
    never over the user's own value. wandb's run is finished after the fold, so the next fold starts
    its own instead of logging into this one."""
    env = {}
    if cfg.train.report_to == "wandb":
        env = {"WANDB_RUN_GROUP": out.group, "WANDB_PROJECT": "vlmexp"}
    elif cfg.train.report_to == "mlflow":
        env = {"MLFLOW_TAGS": json.dumps({"vlmexp.run": out.group, "vlmexp.fold_run": out.name})}
    mine = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)
        wandb = sys.modules.get("wandb")  # imported by the trainer's WandbCallback, if it ran
        if cfg.train.report_to == "wandb" and wandb is not None and wandb.run is not None:
            wandb.finish()


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
