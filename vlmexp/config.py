"""The experiment config: dataclasses are the schema, OmegaConf merges the layers.

Layers, later wins: the defaults below < `experiments/<experiment>.yaml` < `key=value` arguments.
Every field has a default and a one-line comment; `exp config` prints the resolved result.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

EXPERIMENTS_DIR = Path("experiments")


class ConfigError(ValueError):
    """A config problem the user must fix; the message says how."""


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to `choices`; checked in `validate`."""
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field, e.g. Range(gt=0) for a learning rate; checked in `validate`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, v: float) -> bool:
        if v != v:  # NaN (train.lr=nan) compares False with every bound
            return False
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )

    def __str__(self) -> str:
        """'>= 1', '> 0', 'in [0, 1]', 'in [0, 1)'."""
        lo = (self.ge, "[") if self.ge is not None else (self.gt, "(") if self.gt is not None else None
        hi = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lo and hi:
            return f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        if lo:
            return f"{'>=' if lo[1] == '[' else '>'} {lo[0]:g}"
        return f"{'<=' if hi[1] == ']' else '<'} {hi[0]:g}" if hi else "any number"


def ranged(default: float, **bounds: float) -> Any:
    """A numeric field with its allowed range beside it, e.g. `lr: float = ranged(2e-4, gt=0)`."""
    return field(default=default, metadata={"range": Range(**bounds)})


@dataclass
class DataConfig:
    dir: str = "demo_data"  # competition folder with train.csv, test.csv, labels.json, images
    train_csv: str = "train.csv"  # training table, relative to `dir`
    test_csv: str = "test.csv"  # test table, relative to `dir`
    labels_json: str = "labels.json"  # {label: description}; its order is the class order
    image_col: str = "image"  # column with the image path relative to `dir`, e.g. "images/train_001.png"
    label_col: str = "label"  # column with the gold label in train.csv
    reason_col: str = "reason"  # optional column with a short reason for reason-then-label prompts
    group_col: str = "group"  # optional column; rows of one group never straddle folds
    id_col: str = "id"  # test.csv id column, copied to the submission
    limit: int = ranged(0, ge=0)  # first N train AND test rows (0 = all); such a run cannot be submitted
    train_limit: int = ranged(0, ge=0)  # first N train rows only (0 = all): a smoke run that can be submitted
    answers_csv: str = ""  # optional id,label test answers (the demo has test_answers.csv): runs score them
    # Joins parent and child when labels.json nests {parent: {child: description}}: "上衣" + "T恤" ->
    # the label "上衣/T恤" that train.csv holds and the model answers; a name containing it is refused.
    hierarchy_sep: str = "/"
    # Optional train.csv column with each row's parent when labels.json nests, e.g. category1; the label
    # column then may hold the child alone ("T恤"), which becomes the full path "上衣/T恤".
    parent_col: str = "parent"


@dataclass
class ModelConfig:
    name: str = (
        "tiny:qwen2_vl"  # hub id, local folder, or tiny:<family> (qwen2_vl, qwen2_5_vl, smolvlm, llava)
    )
    quant: str = choice("none", "4bit")  # 4bit = QLoRA: NF4, double quantisation, bf16 compute
    finetune: str = choice("lora", "full")  # full fine-tuning trains every weight (no adapter)
    attn: str = choice("auto", "sdpa", "eager", "flash_attention_2")  # auto: FA2 when installed, else sdpa
    dtype: str = choice("auto", "bfloat16", "float16", "float32")  # auto: bf16 on GPU, fp32 on CPU
    cache_dir: str = ".cache/tiny"  # where tiny:<family> models are built once
    head: str = choice("lm", "cls")  # cls: a linear head on the last hidden state, one forward (cls_head.py)
    head_pool: str = choice("last", "mean")  # head=cls pools the last prompt token, or the mean of the prompt
    head_label_smoothing: float = ranged(0.0, ge=0, lt=1)  # head=cls cross-entropy smoothing, e.g. 0.1


@dataclass
class ImageConfig:
    min_pixels: int = ranged(0, ge=0)  # lower bound on H*W after resizing (0 = the processor's default)
    max_pixels: int = ranged(0, ge=0)  # upper bound on H*W (0 = processor default); 1024*28*28 keeps text
    longest_side: int = ranged(0, ge=0)  # if > 0, downscale so the longest side is at most this many px
    resize: int = ranged(0, ge=0)  # if > 0, resize every image to resize x resize (ignores aspect ratio)


@dataclass
class LoraConfig:
    r: int = ranged(16, ge=1)  # adapter rank
    alpha: int = ranged(32, gt=0)  # scaling numerator; effective scale alpha/r (or alpha/sqrt(r) with rslora)
    dropout: float = ranged(0.05, ge=0, lt=1)  # dropout on the adapter input
    rslora: bool = False  # rank-stabilised scaling alpha/sqrt(r)
    bias: str = choice("none", "all", "lora_only")  # which biases train
    modules_to_save: list[str] = field(default_factory=list)  # fully trained modules, e.g. ["lm_head"]
    language: bool = True  # adapt the language model's layers
    vision: bool = False  # adapt the vision tower's layers
    attention: bool = True  # adapt attention projections (q/k/v/o)
    mlp: bool = True  # adapt MLP projections (gate/up/down, fc1/fc2)
    target_modules: list[str] = field(default_factory=list)  # explicit list/regex; overrides the switches


@dataclass
class TrainConfig:
    epochs: float = ranged(3.0, ge=1)  # passes over each fold's training split
    batch_size: int | str = ranged(8, ge=1)  # per-device micro batch; auto: the largest the GPU fits
    grad_accum: int = ranged(1, ge=1)  # micro batches per optimizer step
    lr: float = ranged(2e-4, gt=0)  # peak learning rate (LoRA); use ~1e-5 for full fine-tuning
    lr_rule: str = choice("sqrt", "linear", "none")  # batch_size=auto picks B: lr x sqrt(B/8), x B/8 or as is
    scheduler: str = "cosine"  # any transformers scheduler name, e.g. linear, cosine, constant
    warmup_ratio: float = ranged(0.05, ge=0, le=1)  # share of steps spent warming up
    weight_decay: float = ranged(0.0, ge=0)  # AdamW weight decay
    max_grad_norm: float = ranged(1.0, ge=0)  # gradient clipping
    gradient_checkpointing: str = choice("auto", "on", "off")  # auto: off on CPU, on for big GPU models
    optim: str = "adamw_torch"  # any transformers optimizer name, e.g. adamw_torch_fused, paged_adamw_8bit
    bf16: str = choice("auto", "on", "off")  # auto: on when the GPU supports it
    tf32: bool = True  # allow TF32 matmuls on Ampere+ GPUs
    eval: bool = True  # evaluate accuracy/macro-F1 on the validation split and keep the best checkpoint
    eval_every: float = ranged(1.0, gt=0)  # evaluate every this many epochs
    mix_dataset: str = ""  # optional JSONL of general {"messages": ...} samples mixed in to keep skills
    mix_ratio: float = ranged(0.0, ge=0)  # mixed samples per competition sample, e.g. 0.1
    max_length: int = ranged(2048, ge=1)  # truncate longer samples (tokens)
    logging_steps: int = ranged(5, ge=1)  # log loss every N optimizer steps
    save_every: int = ranged(0, ge=0)  # checkpoint every N steps (0: every epoch); a rerun resumes there
    # where the trainer logs, one run per fold named <run>-fold<k> (tensorboard: runs/<run>/tb/fold<k>)
    report_to: str = choice("tensorboard", "wandb", "mlflow", "trackio", "none")
    # any other SFTConfig/TrainingArguments field, e.g. train.args.neftune_noise_alpha=5 (train_args.py)
    args: dict[str, Any] = field(default_factory=dict)
    gpus_per_fold: int = ranged(1, ge=1)  # > 1: one fold sharded over this many GPUs (FSDP), e.g. 4 for 72B


@dataclass
class PredictConfig:
    mode: str = choice("score", "generate")  # score: label log-likelihoods; generate: greedy decode + parse
    batch_size: int = ranged(8, ge=1)  # images per prediction batch
    max_new_tokens: int = ranged(128, ge=1)  # generation budget for reasons / chain of thought
    backend: str = choice("local", "openai")  # openai: predict through an OpenAI-compatible server
    base_url: str = ""  # server URL for backend=openai, e.g. http://127.0.0.1:8000/v1
    server_model: str = ""  # model name on that server (empty: the server's only model)
    # backend=openai: fold k's model on that server, {run} = run folder name, e.g. "{run}/fold{k}" (exp serve)
    # or "fold{k}" (vllm serve --enable-lora --lora-modules fold0=runs/X/folds/fold0/adapter ...)
    model_per_fold: str = ""
    tta: str = choice("none", "scales", "crops")  # test-time views, probs averaged (engine/tta.py); no flips
    concurrency: int = ranged(4, ge=1)  # requests in flight for backend=openai; vLLM takes far more, e.g. 64


@dataclass
class SpeedConfig:
    # Levers that change speed, not results (beyond bf16 rounding): left out of the config hash.
    encode_once: bool = True  # process each row's images and text once per run, pad per batch
    vision_cache: str = choice("auto", "on", "off")  # frozen vision tower: features once per image; auto=on
    vision_cache_gib: float = ranged(16.0, ge=0)  # GPU memory for cached features (3B, 448 px: 1 MiB each)
    compile: bool = False  # torch.compile each decoder layer (CUDA only; each new batch length compiles)
    vision_pad: bool = True  # CUDA: zero-pad a frozen vision MLP 3420 -> 3456 (x128): same output, faster
    vision_compile: bool = False  # CUDA: compile each frozen vision block, static shapes, image-count buckets
    reuse_base: bool = True  # LoRA runs: load the base once per run, a fresh adapter per fold (base_once.py)


@dataclass
class PromptConfig:
    dir: str = ""  # a folder of your own .jinja templates; its names add to or override the shipped ones
    budget: int = ranged(2500, ge=1)  # warn over this many prompt chars; long prompts scored worse


@dataclass
class OcrConfig:
    enabled: bool = False  # put the image's OCR text into the prompt as `ocr_text`
    max_chars: int = ranged(600, ge=0)  # cut the OCR text to this many characters
    min_confidence: float = ranged(0.5, ge=0, le=1)  # drop OCR lines below this confidence
    cache_dir: str = ".cache/ocr"  # per-image-hash cache shared by all runs


@dataclass
class PseudoConfig:
    rounds: int = ranged(0, ge=0)  # extra rounds: each trains on train + confident test preds of the last
    source: str = ""  # take pseudo-labels from this finished run's test ensemble (name or folder)
    min_agree: float = ranged(1.0, ge=0, le=1)  # share of folds voting the ensemble's label; 1.0 = 5 of 5
    min_confidence: float = ranged(0.9, ge=0, le=1)  # ensemble probability of that label must reach this
    round: int = ranged(0, ge=0)  # which pseudo-label round this run is (set by pseudo.rounds chaining)


@dataclass
class EnsembleConfig:
    vote: str = choice("soft", "majority")  # soft: mean of fold probabilities
    reconcile: str = choice(
        "soft", "majority", "confident", "rerun"
    )  # policy for samples the folds disagree on
    rerun_from: str = ""  # for reconcile=rerun: a finished run whose models re-predict the disputed samples
    suspect_confidence: float = ranged(0.9, ge=0, le=1)  # OOF prob of another label above this: suspect
    suspects: str = choice("keep", "relabel", "drop")  # what this run does with a source run's suspects
    suspects_from: str = ""  # run whose suspect_labels.csv to apply
    calibrate: str = choice("none", "bias")  # bias: per-class log-prob offsets fitted on OOF for the metric


@dataclass
class RayConfig:
    # Where launcher=ray sends the folds; none of this changes results (left out of the hash).
    address: str = ""  # "" starts a local Ray instance; auto joins `ray start`; or ray://HOST:10001
    max_retries: int = ranged(
        3, ge=0
    )  # a fold task whose process dies (kill -9, node lost) reruns this often
    cpus_per_fold: float = ranged(1.0, gt=0)  # CPUs each fold task reserves, e.g. 8 on a GPU node


@dataclass
class Config:
    experiment: str = ""  # name of experiments/<experiment>.yaml applied over the defaults
    name: str = ""  # run folder name; default: <experiment or prompt>-<config hash>
    runs_dir: str = "runs"  # where run folders live
    leaderboard: str = "experiments/leaderboard.csv"  # every finished run appends one row here
    prompt: str = "baseline"  # template name: baseline, label_desc, reason_label, cot, describe_classify
    folds: int = ranged(5, ge=2)  # K of stratified (grouped if the data has groups) K-fold
    fold_seed: int = ranged(42, ge=0)  # seed of the fold assignment (shared by all runs on the same data)
    seed: int = ranged(42, ge=0)  # training seed
    metric: str = choice("macro_f1", "accuracy")  # the score that ranks runs
    gpus: int = ranged(1, ge=1)  # > 1: folds train in parallel, one process per GPU (torchrun)
    balance: str = choice("none", "oversample", "sqrt", "undersample")  # class resampling of train splits
    launcher: str = choice("local", "ray")  # ray: every unfinished fold of every run is a Ray task
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    # Filled by load_config, not a key you set: {key: value as written} of values read from the
    # environment, e.g. {"predict.base_url": "${oc.env:VLLM_URL}"}; config.yaml, overrides.json and the
    # leaderboard show this text, never the resolved value (which may be a secret).
    interpolations: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})


# Fields that name or place a run without changing its results: left out of the hash,
# so that `name=foo` reruns into the same numbers.
# A dotted key leaves out one field: changing only the answers scored (data.answers_csv) must not
# retrain folds that are already done.
_UNHASHED = {
    "name",
    "runs_dir",
    "experiment",
    "leaderboard",
    "gpus",
    "speed",
    "launcher",
    "ray",
    "data.answers_csv",
    "train.save_every",  # checkpoints and trackers watch a run; they do not change it
    "train.report_to",
}


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        key = prefix + f.name
        keys.append(key)
        if is_dataclass(f.type) or (isinstance(f.default_factory, type) and is_dataclass(f.default_factory)):
            keys += _all_keys(f.default_factory, key + ".")
    return keys


def _field(key: str) -> Any:
    """The dataclass field behind a dotted key."""
    cls, f = Config, None
    for part in key.split("."):
        f = {x.name: x for x in fields(cls)}[part]
        cls = f.default_factory if isinstance(f.default_factory, type) else None
    return f


def nearest_key(key: str) -> str:
    keys = _all_keys()
    section, _, leaf_name = key.rpartition(".")
    if section and section in keys:
        # "lora.rank" -> stay inside lora.*: "lora.r", not a key of another section.
        inside = [k for k in keys if k.startswith(section + ".")]
        leaves = [k.rpartition(".")[2] for k in inside]
        prefixed = [leaf for leaf in leaves if leaf_name.startswith(leaf)]  # "rank" starts with "r"
        best = max(prefixed, key=len) if prefixed else difflib.get_close_matches(leaf_name, leaves, 1, 0.0)[0]
        return f"{section}.{best}"
    best = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    # "lr" should suggest train.lr, not "dir": compare the last part too.
    leaf = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
    if leaf:
        candidates = [k for k in keys if k.split(".")[-1] == leaf[0]]
        return min(candidates, key=len)
    return best[0]


def _check_keys(dotlist: list[str], source: str) -> None:
    valid = set(_all_keys())
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"{source}: '{item}' is not key=value; write e.g. prompt=label_desc")
        key = item.split("=", 1)[0].lstrip("+")
        if key not in valid and not key.startswith("train.args."):  # trainer options: checked in validate
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{nearest_key(key)}'?")


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


def experiment_path(name: str, experiments_dir: Path | None = None) -> Path:
    d = experiments_dir or EXPERIMENTS_DIR
    path = d / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in d.glob("*.yaml")) if d.exists() else []
        raise ConfigError(
            f"experiment '{name}': no file {path}; experiments here: {', '.join(have) or 'none'}"
        )
    return path


def load_config(overrides: list[str] | None = None, experiments_dir: Path | None = None) -> Config:
    """Resolve defaults < experiment YAML < key=value overrides into a validated Config."""
    overrides = list(overrides or [])
    _check_keys(overrides, "argument")
    cfg: DictConfig = OmegaConf.structured(Config)
    cli = _merge(OmegaConf.structured(Config), _dotlist(overrides), "argument")
    _refuse_env_names(_env_values(OmegaConf.to_container(cli, resolve=False)), "argument")
    experiment = cli.experiment
    if experiment:
        path = experiment_path(experiment, experiments_dir)
        raw = _cleared(OmegaConf.to_container(OmegaConf.load(path)) or {})
        _check_keys(_flatten(raw), str(path))
        cfg = _merge(cfg, OmegaConf.create(raw), str(path))
    cfg = _merge(cfg, _dotlist(overrides), "argument")
    cfg.experiment = experiment
    config = _to_config(cfg, "argument")
    _check_prompt(config)
    return config


def load_config_file(path: Path, overrides: list[str] | None = None) -> Config:
    """The Config saved in a run folder's config.yaml (a full dump), plus optional key=value overrides."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    if overrides:
        _check_keys(overrides, "argument")
        cfg = _merge(cfg, _dotlist(overrides), "argument")
    return _to_config(cfg, str(path))


def _dotlist(overrides: list[str]) -> DictConfig:
    try:
        layer = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except yaml.YAMLError as e:
        raise ConfigError(
            f"argument: cannot parse {' '.join(overrides)!r}: {str(e).splitlines()[0]}; "
            "quote values with brackets or colons, e.g. 'lora.target_modules=[q_proj,v_proj]'"
        ) from None
    return OmegaConf.create(_cleared(layer))


def _cleared(layer: dict, prefix: str = "") -> dict:
    """An empty value clears a text option to "" and a list option to [] (`data.answers_csv=` turns the
    answers file off) instead of failing on None; other fields keep None, which their type refuses."""
    out = {}
    keys = set(_all_keys())
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            v = _cleared(v, key + ".")
        elif v is None and key in keys:
            kind = str(_field(key).type)
            v = {"str": "", "list": [], "dict": {}}.get(kind.split("[")[0])
        out[k] = v
    return out


# A value read from outside the config calls a resolver, e.g. "${oc.env:OPENAI_API_KEY}"; "${prompt}"
# (another key's value) does not.
_RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")
# Keys that become folder names and leaderboard rows: they must be written out, not read from outside.
_NAMING = ("name", "experiment", "prompt")


def _env_values(raw: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value as written} of every value that calls a resolver, at any depth of `raw`."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key == "interpolations":
            continue
        if isinstance(v, dict):
            out |= _env_values(v, key + ".")
        elif any(isinstance(x, str) and _RESOLVER.search(x) for x in (v if isinstance(v, list) else [v])):
            out[key] = v
    return out


def _refuse_env_names(written: dict[str, Any], source: str) -> None:
    for key in _NAMING:
        if key in written:
            raise ConfigError(
                f"{source}: '{key}={written[key]}': {key} becomes part of the run folder name and the "
                f"leaderboard, so it cannot come from the environment; write it out, e.g. {key}=my-run"
            )


def _to_config(cfg: DictConfig, source: str) -> Config:
    """The validated Config of a merged DictConfig; environment values resolved, and kept as written in
    `Config.interpolations` for everything printed (names, config.yaml, overrides.json, the leaderboard)."""
    written = _env_values(OmegaConf.to_container(cfg, resolve=False))
    _refuse_env_names(written, source)
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{source}: cannot resolve '{e.full_key}': {str(e).splitlines()[0]}; "
            "e.g. export the environment variable it reads"
        ) from None
    config.interpolations = written
    validate(config)
    return config


def _check_prompt(cfg: Config) -> None:
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


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except (ValidationError, ConfigKeyError) as e:
        key = e.full_key or "?"
        want = getattr(_field(key), "type", "?") if key in set(_all_keys()) else "?"
        raise ConfigError(
            f"{source}: bad value for '{key}': {e.msg.splitlines()[0]} (expected {want})"
        ) from None


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
    if cfg.train.batch_size == "auto":
        out.append(f"train.batch_size=auto is not built for train.gpus_per_fold={n}: give a multiple of {n}")
    elif cfg.train.batch_size % n:
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


def to_dict(cfg: Config) -> dict:
    """Every field as the code sees it (environment values resolved): what the hash covers."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    d.pop("interpolations", None)
    return d


def _as_written(cfg: Config) -> dict:
    """`to_dict` with every environment value back as written, e.g. "${oc.env:OPENAI_API_KEY}"."""
    d = to_dict(cfg)
    for key, text in cfg.interpolations.items():
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            node = node[part]
        node[leaf] = text
    return d


def to_yaml(cfg: Config) -> str:
    """The config as written (environment values unresolved): loading it back resolves them again."""
    return OmegaConf.to_yaml(OmegaConf.create(_as_written(cfg)))


def changes_results(key: str) -> bool:
    """Whether a dotted key can change a run's results: False for `runs_dir`, `speed.compile`, ..."""
    return key not in _UNHASHED and key.split(".")[0] not in _UNHASHED


def config_hash(cfg: Config) -> str:
    """Stable 8-hex hash of everything that changes results (not name/runs_dir/experiment)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _UNHASHED}
    defaults = to_dict(Config())
    for key in (k for k in _UNHASHED if "." in k):
        # Reset to its default rather than dropped: runs that never set it keep the hash they had.
        section, leaf = key.split(".")
        d[section][leaf] = defaults[section][leaf]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def diff_from_defaults(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every field that differs from the defaults, e.g. {"lora.r": 32}."""
    # As written: this lands in overrides.json and the git-tracked leaderboard, so an API key read
    # with ${oc.env:...} stays that text.
    base, mine = _leaves(to_dict(Config())), _leaves(_as_written(cfg))
    return {k: v for k, v in mine.items() if base.get(k, _ABSENT) != v and k.split(".")[0] not in _UNHASHED}


_ABSENT = object()


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_name(cfg: Config) -> str:
    return cfg.name or f"{cfg.experiment or cfg.prompt}-{config_hash(cfg)}"
