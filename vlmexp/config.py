"""The experiment config: dataclasses are the schema, OmegaConf merges the layers.

Layers, later wins: the defaults below < `experiments/<experiment>.yaml` < `key=value` arguments.
Every field has a default and a one-line comment; `exp config` prints the resolved result.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

EXPERIMENTS_DIR = Path("experiments")


class ConfigError(ValueError):
    """A config problem the user must fix; the message says how."""


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to `choices`; checked in `validate`."""
    return field(default=default, metadata={"choices": (default, *choices)})


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
    limit: int = 0  # use only the first N train and test rows (0 = all), for smoke tests
    answers_csv: str = ""  # optional id,label test answers (the demo has test_answers.csv): runs score them


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


@dataclass
class ImageConfig:
    min_pixels: int = 0  # lower bound on H*W after resizing (0 = the processor's default)
    max_pixels: int = (
        0  # upper bound on H*W (0 = processor default); ~ 1024*28*28 keeps screenshot text legible
    )
    longest_side: int = 0  # if > 0, downscale so the longest side is at most this many px
    resize: int = 0  # if > 0, resize every image to resize x resize (ignores aspect ratio)


@dataclass
class LoraConfig:
    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator; effective scale alpha/r (or alpha/sqrt(r) with rslora)
    dropout: float = 0.05  # dropout on the adapter input
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
    epochs: float = 3.0  # passes over each fold's training split
    batch_size: int = 8  # per-device micro batch
    grad_accum: int = 1  # micro batches per optimizer step
    lr: float = 2e-4  # peak learning rate (LoRA); use ~1e-5 for full fine-tuning
    scheduler: str = "cosine"  # any transformers scheduler name, e.g. linear, cosine, constant
    warmup_ratio: float = 0.05  # share of steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    gradient_checkpointing: str = choice("auto", "on", "off")  # auto: off on CPU, on for big GPU models
    optim: str = "adamw_torch"  # any transformers optimizer name, e.g. adamw_torch_fused, paged_adamw_8bit
    bf16: str = choice("auto", "on", "off")  # auto: on when the GPU supports it
    tf32: bool = True  # allow TF32 matmuls on Ampere+ GPUs
    eval: bool = True  # evaluate accuracy/macro-F1 on the validation split and keep the best checkpoint
    eval_every: float = 1.0  # evaluate every this many epochs
    mix_dataset: str = ""  # optional JSONL of general {"messages": ...} samples mixed in to keep skills
    mix_ratio: float = 0.0  # mixed samples per competition sample, e.g. 0.1
    max_length: int = 2048  # truncate longer samples (tokens)
    logging_steps: int = 5  # log loss every N optimizer steps


@dataclass
class PredictConfig:
    mode: str = choice("score", "generate")  # score: label log-likelihoods; generate: greedy decode + parse
    batch_size: int = 8  # images per prediction batch
    max_new_tokens: int = 128  # generation budget for reasons / chain of thought
    backend: str = choice("local", "openai")  # openai: predict through an OpenAI-compatible server
    base_url: str = ""  # server URL for backend=openai, e.g. http://127.0.0.1:8000/v1
    server_model: str = ""  # model name on that server (empty: the server's only model)
    concurrency: int = 4  # requests in flight for backend=openai; vLLM takes far more, e.g. 64


@dataclass
class SpeedConfig:
    # Levers that change speed, not results (beyond bf16 rounding): left out of the config hash.
    encode_once: bool = True  # process each row's images and text once per run, pad per batch
    vision_cache: str = choice("auto", "on", "off")  # frozen vision tower: features once per image; auto=on
    vision_cache_gib: float = 16.0  # most GPU memory the cached features may take (3B, 448 px: 1 MiB each)
    compile: bool = False  # torch.compile each decoder layer (CUDA only; each new batch length compiles)


@dataclass
class PromptConfig:
    dir: str = ""  # a folder of your own .jinja templates; its names add to or override the shipped ones
    budget: int = 2500  # warn when a rendered prompt is longer (characters); longer prompts scored worse


@dataclass
class OcrConfig:
    enabled: bool = False  # put the image's OCR text into the prompt as `ocr_text`
    max_chars: int = 600  # cut the OCR text to this many characters
    min_confidence: float = 0.5  # drop OCR lines below this confidence
    cache_dir: str = ".cache/ocr"  # per-image-hash cache shared by all runs


@dataclass
class PseudoConfig:
    rounds: int = 0  # extra rounds: each trains on train + confident test predictions of the round before
    source: str = ""  # take pseudo-labels from this finished run's test ensemble (name or folder)
    min_agree: float = 1.0  # share of folds that must vote the ensemble's label, e.g. 1.0 = 5 of 5
    min_confidence: float = 0.9  # ensemble probability of that label must reach this
    round: int = 0  # which pseudo-label round this run is (set by pseudo.rounds chaining)


@dataclass
class EnsembleConfig:
    vote: str = choice("soft", "majority")  # soft: mean of fold probabilities
    reconcile: str = choice(
        "soft", "majority", "confident", "rerun"
    )  # policy for samples the folds disagree on
    rerun_from: str = ""  # for reconcile=rerun: a finished run whose models re-predict the disputed samples
    suspect_confidence: float = 0.9  # OOF prob of another label above this marks a training label suspect
    suspects: str = choice("keep", "relabel", "drop")  # what this run does with a source run's suspects
    suspects_from: str = ""  # run whose suspect_labels.csv to apply


@dataclass
class Config:
    experiment: str = ""  # name of experiments/<experiment>.yaml applied over the defaults
    name: str = ""  # run folder name; default: <experiment or prompt>-<config hash>
    runs_dir: str = "runs"  # where run folders live
    leaderboard: str = "experiments/leaderboard.csv"  # every finished run appends one row here
    prompt: str = "baseline"  # template name: baseline, label_desc, reason_label, cot, describe_classify
    folds: int = 5  # K of stratified (grouped if the data has groups) K-fold
    fold_seed: int = 42  # seed of the fold assignment (shared by all runs on the same data)
    seed: int = 42  # training seed
    metric: str = choice("macro_f1", "accuracy")  # the score that ranks runs
    gpus: int = 1  # > 1: folds train in parallel, one process per GPU, launched through torchrun
    balance: str = choice("none", "oversample", "sqrt", "undersample")  # class resampling of train splits
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


# Fields that name or place a run without changing its results: left out of the hash,
# so that `name=foo` reruns into the same numbers.
_UNHASHED = {"name", "runs_dir", "experiment", "leaderboard", "gpus", "speed"}


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
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
        if key not in valid:
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
    cli = _merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides), "argument")
    experiment = cli.experiment
    if experiment:
        path = experiment_path(experiment, experiments_dir)
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        _check_keys(_flatten(raw), str(path))
        cfg = _merge(cfg, OmegaConf.create(raw), str(path))
    cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "argument")
    cfg.experiment = experiment
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def load_config_file(path: Path, overrides: list[str] | None = None) -> Config:
    """The Config saved in a run folder's config.yaml (a full dump), plus optional key=value overrides."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    if overrides:
        _check_keys(overrides, "argument")
        cfg = _merge(cfg, OmegaConf.from_dotlist(overrides), "argument")
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except (ValidationError, ConfigKeyError) as e:
        key = e.full_key or "?"
        want = getattr(_field(key), "type", "?") if key in set(_all_keys()) else "?"
        raise ConfigError(
            f"{source}: bad value for '{key}': {e.msg.splitlines()[0]} (expected {want})"
        ) from None


def validate(cfg: Config) -> None:
    for key in _all_keys():
        f = _field(key)
        allowed = f.metadata.get("choices")
        if allowed:
            value = OmegaConf.select(OmegaConf.structured(cfg), key)
            if value not in allowed:
                raise ConfigError(f"'{key}={value}' is not allowed; choose one of: {', '.join(allowed)}")
    if cfg.folds < 2:
        raise ConfigError(f"'folds={cfg.folds}': K-fold needs at least 2 folds, e.g. folds=5")
    if not 0.0 <= cfg.pseudo.min_agree <= 1.0:
        raise ConfigError(
            f"'pseudo.min_agree={cfg.pseudo.min_agree}' is a share of folds in [0, 1], e.g. 0.8"
        )
    if cfg.predict.backend == "openai" and not cfg.predict.base_url:
        raise ConfigError("predict.backend=openai needs predict.base_url=http://HOST:PORT/v1")


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Stable 8-hex hash of everything that changes results (not name/runs_dir/experiment)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _UNHASHED}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def diff_from_defaults(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every field that differs from the defaults, e.g. {"lora.r": 32}."""
    base, mine = to_dict(Config()), to_dict(cfg)
    out = {}
    for key in _all_keys():
        a, b = OmegaConf.select(OmegaConf.create(base), key), OmegaConf.select(OmegaConf.create(mine), key)
        if not isinstance(a, DictConfig) and a != b and key.split(".")[0] not in _UNHASHED:
            out[key] = OmegaConf.to_container(b) if hasattr(b, "_content") else b
    return out


def run_name(cfg: Config) -> str:
    return cfg.name or f"{cfg.experiment or cfg.prompt}-{config_hash(cfg)}"
