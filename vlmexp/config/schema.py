"""The schema: one dataclass per config section, each field with its default, its allowed values
(`choice`, `ranged`) and a one-line comment; plus the dotted-key helpers and the keys the run hash
leaves out."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


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
    batch_size: int | str = ranged("auto", ge=1)  # per-device micro batch; auto: the largest the GPU fits
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
    batch_size: int = ranged(32, ge=1)  # images per prediction batch (32: 3x the images/s of 8 on a 3B)
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
    compile_dynamic: bool = False  # speed.compile: one graph for all batch shapes (3B demo run: slower)
    vision_pad: bool = True  # CUDA: zero-pad a frozen vision MLP 3420 -> 3456 (x128): same output, faster
    vision_patch_gemm: bool = True  # CUDA: a frozen tower's patch-embedding conv as one matmul (same sums)
    vision_compile: bool = False  # CUDA: compile each frozen vision block, static shapes, image-count buckets
    vision_prepass: bool = True  # tower over a fold's new images first, one image size a call
    reuse_base: bool = True  # LoRA runs: load the base once per run, a fresh adapter per fold (base_once.py)
    lora_bf16_inputs: bool = True  # bf16 autocast training: LoRA takes bf16 inputs, no fp32 copy (train.py)
    predict_autocast: bool = True  # bf16 models predict under autocast, LoRA in bf16 as trained (predict.py)
    predict_merge: bool = True  # LoRA folded into a copy of the base weights while predicting (lora_merge.py)
    cudnn_attention: bool = False  # let SDPA pick cuDNN's kernel: a graph build per new shape (speed.py)
    fused_norm: bool = True  # CUDA: Llama-style RMSNorm as torch's one fused kernel, same output
    liger: bool = True  # CUDA with liger-kernel (pip install ".[gpu]"): SwiGLU, RoPE as fused kernels
    causal_only: bool = True  # right-padded training batches: no padding mask, SDPA runs flash (same loss)
    lora_fused: bool = True  # training: LoRA's up-projection, scaling and add in one addmm (lora_fused.py)
    freeze_heap: bool = True  # gc.freeze() what lives all run (imports, data): full GCs skip it (heap.py)


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
    )  # policy for samples the folds disagree on; soft (the default) follows vote=majority
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
