"""The base model loaded (or quantised) once per run; each fold gets a fresh LoRA adapter on it.

Loading a 3B model's weights took ~5 s a time on the H200 and a 7B QLoRA load re-quantises every
time; a 5-fold run loaded them 10 times (train, then again for prediction). Here the base is loaded at
the first fold, each fold wraps it in a new adapter seeded exactly as `load_model` seeds it, trains,
predicts with the trained model still in memory, and `unload()` takes the adapter back off, leaving
the base weights as they were loaded for the next fold.

Only for LoRA runs with the language-model head on one process: a full fine-tune changes the base
weights themselves, a classification head hangs off the model and a sharded fold's weights belong to
FSDP, so those load per fold as before (`speed.reuse_base=false` forces that path too).
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import set_seed

from vlmexp.config import Config
from vlmexp.models.load import load_for_inference, load_model
from vlmexp.models.lora import apply_lora

log = logging.getLogger(__name__)


def reusable(cfg: Config) -> bool:
    """Whether one base can serve every fold of this run (see the module docstring for why not)."""
    return (
        cfg.speed.reuse_base
        and cfg.model.finetune == "lora"
        and cfg.model.head == "lm"
        and cfg.train.gpus_per_fold == 1
        and cfg.predict.backend == "local"
    )


class BaseModel:
    """One per run and process: `for_training(seed)` -> train -> `for_prediction(model)` -> `release`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.shared = reusable(cfg)
        self._base: torch.nn.Module | None = None
        self._loaded_config = None
        self._lent: torch.nn.Module | None = None  # the fold model handed out and not yet released

    def for_training(self, seed: int) -> torch.nn.Module:
        """A LoRA-wrapped model whose adapter starts from the RNG state `seed`, as a fresh load's does."""
        if not self.shared:
            set_seed(seed)
            return load_model(self.cfg, training=True)
        if self._lent is not None:
            # the last fold died before release() (an exception in a Ray worker that takes the next task):
            # take its adapter off first, or the new one would wrap a wrapped model
            self.release(self._lent)
        if self._base is None:
            # load_model(training=True) minus the adapter: quantisation prep included, done once.
            self._base = load_model(self.cfg, training=True, lora=False)
            self._loaded_config = copy.deepcopy(self._base.config)
        set_seed(seed)  # peft draws the adapter's init from the global RNG
        self._lent = apply_lora(self._base, self.cfg)
        return self._lent

    def for_prediction(self, trained: torch.nn.Module | None, adapter_dir) -> torch.nn.Module:
        """The trained fold model in eval mode (its best weights are already loaded), or a fresh load."""
        if not self.shared:
            return load_for_inference(self.cfg, adapter_dir)
        if getattr(trained, "is_gradient_checkpointing", False):
            trained.gradient_checkpointing_disable()  # the trainer's switch; prediction runs no backward
        # Training flips config switches that prediction must not inherit: the KV cache off (scoring
        # reuses the prompt's), and for MoE models trl's `output_router_logits=True`, whose aux loss
        # then fails on the scorer's 4D mask (seen on tiny:qwen3_vl_moe). Back to the loaded values.
        for config, loaded in _configs(trained.config, self._loaded_config):
            for key in _TRAINING_SWITCHES:
                if hasattr(loaded, key):
                    setattr(config, key, getattr(loaded, key))
        return trained.eval()

    def release(self, model: torch.nn.Module | None) -> None:
        """Take the fold's adapter off the shared base (peft `unload`: the original layers come back)."""
        if model is None or not self.shared:
            return
        _restore_saved_modules(model)
        self._base, self._lent = model.unload(), None


def _restore_saved_modules(model: torch.nn.Module) -> None:
    """Put back the original of every `lora.modules_to_save` module (e.g. lm_head, merger). peft's
    `unload()` leaves the fold's *trained* copy in its place (merge semantics: `unload` keeps what the
    adapter learned), so fold 1 started from fold 0's trained lm_head, whose training rows include fold
    1's validation rows: the demo's CV rose fold by fold (0.006, 0.028, 0.059 against 0.005 a fold when
    loading per fold)."""
    from peft.utils.other import AuxiliaryTrainingWrapper  # ModulesToSaveWrapper, TrainableTokensWrapper

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    for name, wrapper in wrapped:  # a list first: the loop replaces modules named_modules() walks
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, wrapper.original_module)


_TRAINING_SWITCHES = ("use_cache", "output_router_logits")


def _configs(config, loaded) -> list[tuple[object, object]]:
    """(config, its loaded copy) for the model's config and its sub-configs (text_config, ...)."""
    pairs = [(config, loaded)]
    for name in ("text_config", "vision_config"):
        if getattr(config, name, None) is not None and getattr(loaded, name, None) is not None:
            pairs.append((getattr(config, name), getattr(loaded, name)))
    return pairs
