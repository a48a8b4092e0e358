"""Checks of a loaded config: every choice and numeric range of the schema, the prompt name, and the
combinations that cannot work, all problems in one error that says how to fix each."""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from omegaconf import OmegaConf

from vlmexp.config.schema import Config, ConfigError, TrainConfig, _all_keys, _field


def check_prompt(cfg: Config) -> None:
    """`prompt=NAME` must name a template (shipped or in prompts.dir): refused here, before any data loads."""
    from vlmexp.prompts.render import SHIPPED_DIR, available_templates, load_template  # jinja only

    if cfg.prompts.dir and not Path(cfg.prompts.dir).is_dir():
        raise ConfigError(
            f"'prompts.dir={cfg.prompts.dir}' is not a folder; point it at a folder of .jinja templates"
        )
    have = available_templates(cfg.prompts.dir)
    name = cfg.prompt.removesuffix(".jinja")
    if name not in have:
        near = difflib.get_close_matches(name, have, n=1, cutoff=0.0)
        where = f"{SHIPPED_DIR}" + (f" or {cfg.prompts.dir}" if cfg.prompts.dir else "")
        raise ConfigError(
            f"'prompt={cfg.prompt}': no template {name}.jinja in {where}; did you mean '{near[0]}'? "
            f"(templates: {', '.join(have)}; add your own with prompts.dir=DIR)"
        )
    if cfg.model.head == "cls" and (marker := load_template(name, cfg.prompts.dir).marker):
        # e.g. reason_label's answer "Reason: red tag\nLabel: sale": the head reads the prompt only, so the
        # reasons would be neither trained nor generated and the run would measure another prompt.
        raise ConfigError(
            f"'prompt={cfg.prompt}' answers with reasoning before {marker.strip()!r}, but model.head=cls "
            f"reads only the prompt and never sees the answer; use a label-only template "
            f"({', '.join(_label_only(have, cfg.prompts.dir))}) or model.head=lm"
        )


def _label_only(names: list[str], user_dir: str) -> list[str]:
    """The templates among `names` whose answer is the label alone (marker ""); broken ones left out."""
    from vlmexp.prompts.render import PromptError, load_template

    out = []
    for name in names:
        try:
            if not load_template(name, user_dir).marker:
                out.append(name)
        except PromptError:
            continue  # a user template with its own problem is reported when it is the one picked
    return out


# What an out-of-range value usually means, added to its error: key -> hint.
_RANGE_HINTS = {
    "folds": "K-fold needs at least 2 folds, e.g. folds=5",
    "train.epochs": "at least one pass over each fold's training split, e.g. train.epochs=3",
    "data.limit": "0 means every row",
    "image.resize": "0 means no resizing",
    "pseudo.min_agree": "a share of folds, e.g. 0.8",
}


_AUTO_OK = {"train.batch_size"}  # numeric keys that also take the word auto


def validate(cfg: Config) -> None:
    """Every choice and numeric range of the schema, all problems in one error, e.g.
    "'train.lr=-1.0' is out of range: train.lr must be > 0"."""
    values = OmegaConf.structured(cfg)
    problems = []
    for key in _all_keys():
        meta = _field(key).metadata
        if "choices" not in meta and "range" not in meta:
            continue
        value = OmegaConf.select(values, key)
        if key in _AUTO_OK and isinstance(value, str):  # train.batch_size=auto (engine/autobatch.py)
            if value != "auto":
                problems.append(f"'{key}={value}' is not allowed; give a number {meta['range']} or auto")
            continue
        allowed, rng = meta.get("choices"), meta.get("range")
        if allowed and value not in allowed:
            problems.append(f"'{key}={value}' is not allowed; choose one of: {', '.join(allowed)}")
        if rng is not None and value not in rng:
            hint = f" ({_RANGE_HINTS[key]})" if key in _RANGE_HINTS else ""
            problems.append(f"'{key}={value}' is out of range: {key} must be {rng}{hint}")
    if 0 < cfg.image.max_pixels < cfg.image.min_pixels:
        problems.append(
            f"'image.min_pixels={cfg.image.min_pixels}' exceeds 'image.max_pixels={cfg.image.max_pixels}'"
        )
    if cfg.ensemble.calibrate != "none" and cfg.ensemble.vote != "soft":
        problems.append(
            f"'ensemble.calibrate={cfg.ensemble.calibrate}' shifts the test ensemble's probabilities, which "
            f"'ensemble.vote={cfg.ensemble.vote}' ignores; use ensemble.vote=soft"
        )
    problems += _sharding_problems(cfg)
    problems += _head_problems(cfg)
    problems += _name_problems(cfg)
    if problems:
        raise ConfigError(
            problems[0] if len(problems) == 1 else "bad config values:\n- " + "\n- ".join(problems)
        )
    if cfg.predict.backend == "openai" and not cfg.predict.base_url:
        raise ConfigError("predict.backend=openai needs predict.base_url=http://HOST:PORT/v1")
    if cfg.train.args:
        from vlmexp.engine.train_args import check_trainer_args  # imports trl: only when args are given

        check_trainer_args(cfg.train.args)
    if cfg.predict.backend == "openai":
        _check_model_per_fold(cfg.predict.model_per_fold)


def _name_problems(cfg: Config) -> list[str]:
    """Names handed to transformers or the tiny-model builder, checked here rather than after the data
    is loaded and fold 0 has started (train.scheduler=nosuch failed there with a traceback). The
    choices are transformers' own enums (SchedulerType, OptimizerNames), so a newer transformers'
    names pass without a list of ours to keep up; the defaults skip the import (training_args pulls in
    bitsandbytes, which prints a line about its CPU kernels)."""
    problems = []
    for key, value, default, enum in (
        ("train.scheduler", cfg.train.scheduler, TrainConfig.scheduler, "trainer_utils.SchedulerType"),
        ("train.optim", cfg.train.optim, TrainConfig.optim, "training_args.OptimizerNames"),
    ):
        if value == default:
            continue
        module, cls = enum.rsplit(".", 1)
        names = [e.value for e in getattr(importlib.import_module(f"transformers.{module}"), cls)]
        if value not in names:
            near = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'? " if near else ""
            problems.append(
                f"'{key}={value}' is not a transformers name; {hint}choose one of: {', '.join(names)}"
            )
    if cfg.model.name.startswith("tiny:"):
        from vlmexp.models.tiny import FAMILIES  # imports transformers: only for a tiny model

        if cfg.model.name.removeprefix("tiny:") not in FAMILIES:
            choices = ", ".join(f"tiny:{f}" for f in FAMILIES)
            problems.append(f"'model.name={cfg.model.name}' is not a tiny model; choose one of: {choices}")
    return problems


def _head_problems(cfg: Config) -> list[str]:
    """model.head=cls answers from its own softmax in one local forward (engine/cls_head.py): what
    cannot reach that head is refused here rather than silently scored another way."""
    if cfg.model.head != "cls":
        return []
    out = []
    if cfg.predict.backend != "local":
        out.append(
            f"model.head=cls with predict.backend={cfg.predict.backend}: a server (vLLM) answers from the LM "
            "head this run never trains, and its parsed text gives no probabilities; use "
            "predict.backend=local (or `exp serve RUN`, which loads each fold's head)"
        )
    if cfg.predict.mode != "score":
        out.append(
            f"model.head=cls with predict.mode={cfg.predict.mode}: the head generates no text, its "
            "softmax is the prediction; use predict.mode=score"
        )
    return out


def _sharding_problems(cfg: Config) -> list[str]:
    """train.gpus_per_fold=N (launch/fsdp.py): what a sharded fold cannot do yet, with the fix."""
    n = cfg.train.gpus_per_fold
    if n <= 1:
        return []
    out = []
    if cfg.train.batch_size != "auto" and cfg.train.batch_size % n:  # auto: a multiple (autobatch.py)
        out.append(
            f"'train.batch_size={cfg.train.batch_size}' is the fold's global batch, split over "
            f"train.gpus_per_fold={n} processes: make it a multiple of {n}"
        )
    if cfg.train.eval:
        out.append(
            f"train.gpus_per_fold={n} keeps the final weights (best-epoch selection of sharded "
            "weights is not built): set train.eval=false"
        )
    if cfg.gpus > 1:
        out.append(
            f"gpus={cfg.gpus} with train.gpus_per_fold={n}: to run several sharded folds at once use "
            "launcher=ray (each fold one task of N GPUs); on one machine use gpus=1"
        )
    return out


def _check_model_per_fold(template: str) -> None:
    from vlmexp.engine.openai_backend import OOF_REFUSAL  # the one wording, beside the code that uses it

    if "{k}" not in template:
        raise ConfigError(OOF_REFUSAL)
    try:
        template.format(run="run", k=0)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"predict.model_per_fold={template!r}: {type(e).__name__} {e}; its only placeholders are "
            "{run} (the run folder's name) and {k} (the fold), e.g. '{run}/fold{k}'"
        ) from None
