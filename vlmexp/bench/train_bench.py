"""Training speed: the tutorial recipe (trl SFTTrainer) against `exp run`'s own trainer, same model.

Both rows start from the same random base weights, the same LoRA init (seeded), the same samples in the
same order, lr 2e-4 constant, AdamW, clipping 1.0 and LoRA dropout 0; the result carries both loss
curves. They supervise slightly different tokens: the reference (messages + assistant_only_loss) also
the template's "\n" after the end of turn ("<|im_end|>", Gemma's "<end_of_turn>"), the project
(prompt-completion) only answer + end of turn, so the curves differ by that token's share, not by noise
alone. trl swaps the hub templates it knows (Qwen2-VL's, Gemma 3's) for copies with {% generation %}
markers, which assistant_only_loss needs, so the reference row runs unchanged on both families.
Timing: wall clock from the end of the warm-up steps to the end of the last step, after a device sync,
so data collation and optimizer steps are included.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import TrainerCallback

from vlmexp.bench import profile
from vlmexp.config import Config, LoraConfig
from vlmexp.engine import vision_speed
from vlmexp.engine.compile import uncompile_blocks
from vlmexp.engine.speed import forget as forget_prepared
from vlmexp.engine.train import training_dataset
from vlmexp.engine.trainer import build_trainer
from vlmexp.models.lora import select_target_modules

MODULES = ("all-linear", "language")


def lora_settings(model: torch.nn.Module, modules: str) -> LoraConfig:
    """The project's LoRA settings for `modules`; all-linear = every Linear but lm_head (peft's
    "all-linear": language and vision towers and the merger), as the tutorial recipe uses."""
    base = LoraConfig(r=16, alpha=32, dropout=0.0)
    if modules == "language":
        return base
    if modules == "all-linear":
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        return replace(base, target_modules=[n.replace(".", r"\.") for n in names])
    raise ValueError(f"modules={modules!r}: choose one of {', '.join(MODULES)}")


def _wrap(model: torch.nn.Module, lora: LoraConfig, seed: int):
    targets = select_target_modules(model, lora)
    torch.manual_seed(seed)  # same LoRA A init in every row
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg), len(targets)


def _restore(peft_model) -> torch.nn.Module:
    base = peft_model.unload()  # the original Linear modules back, adapters dropped
    base.gradient_checkpointing_disable()
    for module in base.modules():  # drop patch_vision_attention's instance-level forward
        module.__dict__.pop("forward", None)
    uncompile_blocks(base)
    forget_prepared(base)  # the next row's build_trainer prepares the base by its own settings
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return base


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _start_row() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


class _Timer(TrainerCallback):
    """Wall clock at the end of step `warmup` (t0), of step `second_pass_at` (t_mid) and of the last."""

    def __init__(self, warmup: int, second_pass_at: int | None = None):
        self.warmup, self.mid_step = warmup, second_pass_at
        self.t0 = self.t_mid = self.t1 = None
        self.losses = []

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        if state.global_step == self.mid_step:
            self.t_mid = time.perf_counter()
        self.t1 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def reference_row(
    model, processor, samples, *, modules: str, batch_size: int, warmup: int, steps: int, lr: float, seed: int
) -> tuple[dict, torch.nn.Module]:
    """The tutorial default: trl SFTTrainer, LoRA r=16, gradient checkpointing on, sdpa, trl's collator."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    peft_model, n_targets = _wrap(model, lora_settings(model, modules), seed)
    cuda = torch.cuda.is_available()
    n = (warmup + steps) * batch_size
    ds = Dataset.from_list([{"messages": s["messages"], "images": s["images"]} for s in samples[:n]])
    timer = _Timer(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=warmup + steps,
            gradient_checkpointing=True,
            bf16=cuda,
            use_cpu=not cuda,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            assistant_only_loss=True,
            max_length=None,
            train_sampling_strategy="sequential",
            seed=seed,
            disable_tqdm=True,
        )
        _start_row()
        trainer = SFTTrainer(
            model=peft_model, args=args, train_dataset=ds, processing_class=processor, callbacks=[timer]
        )
        trainer.train()
    peak = _peak_gib()
    seconds = timer.t1 - timer.t0
    del trainer
    row = {
        "path": "reference",
        "modules": modules,
        "lora_modules": n_targets,
        "gradient_checkpointing": True,
        "samples_per_s": steps * batch_size / seconds,
        "peak_gib": peak,
        "losses": timer.losses,
        "recipe": "trl SFTTrainer, LoRA r=16, gradient checkpointing, sdpa, assistant_only_loss",
    }
    return row, _restore(peft_model)


class _Decision(logging.Handler):
    """Keeps engine/train.py's "gradient checkpointing on/off (why)" line for the row."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record):
        if "checkpointing" in record.getMessage():
            self.text = record.getMessage()


def project_row(
    model,
    processor,
    samples,
    *,
    modules: str,
    batch_size: int,
    warmup: int,
    steps: int,
    lr: float,
    seed: int,
    gc_setting: str = "auto",
    vision_patch: bool = True,
    speed: dict | None = None,
    name: str = "project",
) -> tuple[dict, torch.nn.Module]:
    """`exp run`'s own training path: the same LoRA modules as the reference, then
    `engine.train.training_dataset` + `build_trainer` (trl SFTTrainer, prompt-completion rows, the
    project's collator, automatic checkpointing, the vision patch) and `trainer.train()`. Images are
    encoded once and a frozen tower's features cached (speed.*, switched off by `speed` for ablations),
    as in a run; only the sampler is made sequential, for the reference's order.

    The row's run caches start empty, as in a run's first fold: the first epoch encodes every row and
    runs the tower once per image. Timed steps 1..warmup+steps are therefore split: `samples_per_s`
    over the steps after warm-up of the first pass (images new), and `samples_per_s_cached` over a
    second pass over the same rows (what epochs 2+ and folds 2+ see)."""
    peft_model, n_targets = _wrap(model, lora_settings(model, modules), seed)
    cuda = next(model.parameters()).is_cuda
    cfg = Config()
    t = cfg.train
    t.epochs, t.batch_size, t.lr, t.scheduler, t.warmup_ratio = 1.0, batch_size, lr, "constant", 0.0
    t.weight_decay, t.max_grad_norm, t.logging_steps, t.eval = 0.0, 1.0, 1, False
    t.gradient_checkpointing, t.optim, t.max_length = (
        gc_setting,
        "adamw_torch_fused" if cuda else "adamw_torch",
        8192,
    )
    cfg.seed = seed
    for key, value in (speed or {}).items():
        setattr(cfg.speed, key, value)
    n = (warmup + steps) * batch_size
    t.epochs = 2.0  # pass 2 sees the same rows again: encoded rows and tower features cached
    dataset = training_dataset(cfg, processor, samples[:n])
    timer, decision = _Timer(warmup, second_pass_at=warmup + steps), _Decision()
    callbacks = [timer]
    profiler = None
    if cuda and profile.enabled():  # 3 steps of the cached pass, left out of its rate
        profiler = profile.StepProfiler(f"train-{name}-{modules}", warmup + steps + 1, 3, batch_size)
        callbacks.append(profiler)
    train_log = logging.getLogger("vlmexp.engine.train_args")  # sft_config logs the decision there
    train_log.addHandler(decision)
    level = train_log.level
    train_log.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory() as out:
            _start_row()
            trainer = build_trainer(
                cfg, peft_model, processor, dataset, Path(out), callbacks, vision_patch=vision_patch
            )
            trainer.args.train_sampling_strategy = "sequential"
            trainer.train()
    finally:
        train_log.removeHandler(decision)
        train_log.setLevel(level)
    peak = _peak_gib()
    use_gc = bool(
        getattr(trainer.args, "activation_checkpointing", None) or trainer.args.gradient_checkpointing
    )
    patched = sum(
        getattr(m.__dict__.get("forward"), "__func__", None) is vision_speed._batched_window_forward
        for m in peft_model.modules()
    )
    trainer_vision = trainer.vision_cache
    del trainer
    row = {
        "path": name,
        "modules": modules,
        "lora_modules": n_targets,
        "gradient_checkpointing": use_gc,
        "gc_reason": decision.text,
        "vision_attention_patched": patched,
        "batch_size": batch_size,
        "speed": dict(vars(cfg.speed)),
        "vision_cache": trainer_vision is not None,
        "samples_per_s": steps * batch_size / (timer.t_mid - timer.t0),
        "samples_per_s_cached": profile.unprofiled_rate(
            warmup + steps, batch_size, timer.t1 - timer.t_mid, profiler
        ),
        "peak_gib": peak,
        "losses": timer.losses,
        "recipe": "engine.train.build_trainer: trl SFTTrainer, prompt-completion rows (answer + end of turn)",
    }
    return row, _restore(peft_model)
