"""The run's caches (`RunCaches`): encoded rows (`encode.Encoder`) and a frozen vision tower's
features (`vision_cache.VisionFeatureCache`), made once per run and reused in every fold; and per
model, whether the feature cache may serve it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vlmexp.engine.encode import Encoder
from vlmexp.engine.vision_cache import VisionFeatureCache, vision_cache_unsupported, vision_frozen

log = logging.getLogger(__name__)


@dataclass
class RunCaches:
    """What a run computes once and reuses in every fold: encoded rows and vision features."""

    encoder: Encoder | None  # None: speed.encode_once=false, the processor runs every batch
    vision: VisionFeatureCache | None  # None: speed.vision_cache=off (or no encoder)
    setting: str = "auto"
    vision_trains: bool | None = None  # learnt from the first training model; unknown until then
    _told: bool = False  # the reason the cache is off has been logged

    @classmethod
    def for_run(cls, cfg, processor) -> RunCaches:
        use_vision = cfg.speed.encode_once and cfg.speed.vision_cache != "off"
        # The pixel memo only with a feature cache: speed.vision_cache=off keeps the rows as they were.
        encoder = Encoder(processor, cfg.train.max_length, memo=use_vision) if cfg.speed.encode_once else None
        vision = VisionFeatureCache(max_gib=cfg.speed.vision_cache_gib) if use_vision else None
        return cls(encoder, vision, cfg.speed.vision_cache)

    def bind(self, model) -> None:
        if self.encoder is not None:
            self.encoder.bind(model)

    def vision_for(self, model, training: bool = True) -> VisionFeatureCache | None:
        """The feature cache when `model`'s vision tower is frozen (Qwen-VL, Gemma 3), else None (also for
        Gemma 4, LLaVA, SmolVLM: `vision_cache_unsupported`). A training model tells
        (requires_grad); an inference model cannot, so prediction uses what training learnt."""
        if self.vision is None:
            return None
        if (why := vision_cache_unsupported(model)) is not None:
            if self.setting == "on":
                raise ValueError(f"speed.vision_cache=on, but {why}. Use speed.vision_cache=auto or off.")
            if not self._told:  # once a run, not once a fold
                log.info("speed.vision_cache=auto: %s", why)
                self._told = True
            return None
        if training:
            self.vision_trains = not vision_frozen(model)
            if self.vision_trains and self.setting == "on":
                raise ValueError(
                    "speed.vision_cache=on, but this model's vision tower trains (lora.vision=true, a vision "
                    "module in lora.modules_to_save, or finetune=full) or is not a Qwen-VL or Gemma 3 tower: "
                    "its features change every step. Use speed.vision_cache=auto or off."
                )
        return self.vision if self.vision_trains is False else None
