"""Training speed: the tutorial recipe (trl SFTTrainer) against the project's fast path, same model.

Both rows start from the same random base weights, the same LoRA init (seeded), the same batches in the
same order, lr 2e-4 constant, AdamW, clipping 1.0 and LoRA dropout 0, so their loss curves must agree up
to bf16 noise; the result carries both curves. Timing: wall clock from the end of the warm-up steps to
the end of the last step, after a device sync, so data collation and optimizer steps are included.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import replace

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import TrainerCallback

from vlmexp.bench.synth import collate_train
from vlmexp.config import LoraConfig
from vlmexp.engine import fast
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
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.losses = warmup, None, None, []

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
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
    answer_only: bool = True,
    vision_patch: bool = True,
    vision_cache: bool = True,
    name: str = "project",
) -> tuple[dict, torch.nn.Module]:
    """The project's path: fast.py's pieces on batches built once (images preprocessed once)."""
    peft_model, n_targets = _wrap(model, lora_settings(model, modules), seed)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    patched = fast.patch_vision_attention(peft_model) if vision_patch else 0
    batches = []
    for i in range(warmup + steps):
        b = collate_train(processor, samples[i * batch_size : (i + 1) * batch_size])
        batches.append(fast.precompute_position_ids(peft_model, {k: v.to(device) for k, v in b.items()}))
    keys = [[s["id"] for s in samples[i * batch_size : (i + 1) * batch_size]] for i in range(len(batches))]
    tokens = int(batches[0]["attention_mask"].sum(1).float().mean())
    patches = int(batches[0]["image_grid_thw"][0].prod())
    _start_row()
    use_gc, why = fast.gradient_checkpointing_needed(gc_setting, peft_model, batch_size, tokens, patches)
    if use_gc:
        peft_model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    vision_frozen = not any(p.requires_grad for n, p in peft_model.named_parameters() if ".visual." in n)
    cache = fast.VisionFeatureCache() if vision_cache and vision_frozen else None
    if cache is not None:  # steady state of a run: every image's features computed once, before timing
        for b, k in zip(batches, keys, strict=True):
            cache.encoder_outputs(peft_model, b["pixel_values"], b["image_grid_thw"], k)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=cuda)
    peft_model.train()
    losses, t0 = [], time.perf_counter()
    for i, (b, k) in enumerate(zip(batches, keys, strict=True)):
        mm = cache.encoder_outputs(peft_model, b["pixel_values"], b["image_grid_thw"], k) if cache else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if answer_only:
                loss = fast.answer_only_loss(peft_model, b, mm_encoder_outputs=mm)
            else:
                inputs = {**b, "mm_encoder_outputs": mm, "pixel_values": None} if mm else b
                loss = peft_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i == warmup - 1:
            _sync()
            t0 = time.perf_counter()
    _sync()
    seconds = time.perf_counter() - t0
    peak = _peak_gib()
    del opt, cache
    row = {
        "path": name,
        "modules": modules,
        "lora_modules": n_targets,
        "gradient_checkpointing": use_gc,
        "gc_reason": why,
        "answer_only_loss": answer_only,
        "vision_attention_patched": patched,
        "vision_cache": vision_cache and vision_frozen,
        "samples_per_s": steps * batch_size / seconds,
        "peak_gib": peak,
        "losses": [float(x) for x in losses],
        "tokens_per_sample": tokens,
    }
    return row, _restore(peft_model)
