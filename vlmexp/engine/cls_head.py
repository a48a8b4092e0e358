"""`model.head=cls`: a linear classification head on the VLM's last hidden state, trained beside LoRA.

The model reads only the prompt (the chat up to the generation prompt, no answer tokens), the hidden
state is pooled (`model.head_pool`: `last` = the last prompt token, i.e. where the answer would
start; `mean` = the mean over every prompt position, padding left out) and a Linear(hidden, classes)
gives the logits: cross-entropy against the label index trains it, softmax gives the class
probabilities in one forward, with no label tokens scored at all.

The head lives on the model as `model.cls_head` (so the trainer's optimizer, checkpoints and the
evaluation callback see it) and is saved beside the adapter as `cls_head.safetensors` plus
`cls_head.json` ({"labels": [...], "pool": "last", "hidden_size": 64}). `load_for_inference` attaches
it again, `export_merged` copies it into the merged folder, and `predict` answers from it, in the same
table format as label scoring (`id`, `pred`, `p:<label>`...), so ensembles, OOF scoring, calibration,
`exp ensemble` and submissions need nothing new.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn

from vlmexp.config import Config

WEIGHTS, META = "cls_head.safetensors", "cls_head.json"


class ClsHead(nn.Module):
    """Linear(hidden, n_labels) over the pooled last hidden state; `labels` and `pool` travel with it."""

    def __init__(self, hidden_size: int, labels: list[str], pool: str = "last"):
        super().__init__()
        if pool not in ("last", "mean"):
            raise ValueError(f"head pool={pool!r}; choose last or mean (model.head_pool)")
        self.labels, self.pool = list(labels), pool
        self.linear = nn.Linear(hidden_size, len(labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(pool_hidden(hidden, attention_mask, self.pool).to(self.linear.weight.dtype))


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, T, H) -> (B, H). `last`: the last non-padding position of each row, so left padding
    (prediction) and right padding give the same vector; `mean`: the mean over non-padding positions."""
    mask = attention_mask.to(hidden.device)
    if pool == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    # e.g. mask [0, 0, 1, 1, 1] (left-padded) -> 4; [1, 1, 1, 0, 0] (right-padded) -> 2
    last = mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def new_head(cfg: Config, model, labels: list[str]) -> ClsHead:
    """A fresh head for `model`, attached as `model.cls_head` on the model's device."""
    hidden = model.get_input_embeddings().embedding_dim
    head = ClsHead(hidden, labels, cfg.model.head_pool)
    attach(model, head)
    return head


def attach(model, head: ClsHead) -> None:
    # fp32 head whatever the model's dtype: it is tiny and the softmax wants the precision
    model.add_module("cls_head", head.to(device=next(model.parameters()).device, dtype=torch.float32))


def head_of(model) -> ClsHead:
    head = getattr(model, "cls_head", None)
    if not isinstance(head, ClsHead):
        raise ValueError(
            "model.head=cls but this model carries no classification head: load it with "
            "models.load.load_for_inference from an adapter folder holding cls_head.safetensors"
        )
    return head


def save_head(model, folder: Path) -> None:
    """`cls_head.safetensors` + `cls_head.json` into `folder` (an adapter, checkpoint or export)."""
    head = head_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, folder / WEIGHTS)
    meta = {"labels": head.labels, "pool": head.pool, "hidden_size": head.linear.in_features}
    (folder / META).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")


def has_head(folder: Path | str) -> bool:
    return (Path(folder) / WEIGHTS).is_file() and (Path(folder) / META).is_file()


def load_head(model, folder: Path | str) -> ClsHead:
    """Attach the head saved in `folder` to `model`; fails loud when the folder has none."""
    folder = Path(folder)
    if not has_head(folder):
        raise FileNotFoundError(
            f"{folder}: no {WEIGHTS} + {META}, but model.head=cls needs them; was this folder trained "
            "with model.head=cls? (a head=lm run predicts with model.head=lm)"
        )
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    head = ClsHead(meta["hidden_size"], meta["labels"], meta["pool"])
    head.load_state_dict(load_file(str(folder / WEIGHTS)))
    attach(model, head)
    return head


def copy_head(src: Path, dst: Path) -> None:
    """The head files of `src` into `dst` (e.g. an adapter into its merged export), when it has them."""
    if has_head(src):
        for name in (WEIGHTS, META):
            shutil.copy2(Path(src) / name, Path(dst) / name)


def average_heads(folders: list[Path], out_dir: Path) -> None:
    """The mean of the folds' heads into `out_dir` (`exp export --average-folds`, beside the mean LoRA
    update): the head of one fold with the averaged adapter would not be the folds' model."""
    metas = [json.loads((Path(f) / META).read_text(encoding="utf-8")) for f in folders]
    for folder, meta in zip(folders[1:], metas[1:], strict=True):
        if meta != metas[0]:
            raise ValueError(f"{folder}/{META} differs from {folders[0]}/{META} (labels, pool or size)")
    states = [load_file(str(Path(f) / WEIGHTS)) for f in folders]
    mean = {k: torch.stack([sd[k].float() for sd in states]).mean(0) for k in states[0]}
    save_file(mean, str(Path(out_dir) / WEIGHTS))
    (Path(out_dir) / META).write_text(json.dumps(metas[0], ensure_ascii=False, indent=1), encoding="utf-8")


# -- forward ---------------------------------------------------------------------------------------


def hidden_states(model, inputs: dict) -> torch.Tensor:
    """The language model's last hidden state (B, T, H), final norm applied, without the LM head's
    (B, T, vocab) logits. LoRA layers are injected in place, so the inner model runs them too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    if inner is not None:
        return inner(**inputs, use_cache=False).last_hidden_state
    out = base(**inputs, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1]


def head_logits(model, inputs: dict) -> torch.Tensor:
    return head_of(model)(hidden_states(model, inputs), inputs["attention_mask"])


def predict_head(cfg: Config, model, processor, samples: list[dict], labels: list[str]) -> pd.DataFrame:
    """The prediction table (`id`, `pred`, `p:<label>`...) from the head's softmax, one forward a batch."""
    from vlmexp.engine.predict import _chunks, _encode, _images, _row
    from vlmexp.engine.samples import prompt_messages, split_turn

    head = head_of(model)
    if head.labels != list(labels):
        raise ValueError(
            f"the classification head was trained on labels {head.labels} but this run predicts {labels}; "
            "predict with the labels.json the head was trained with"
        )
    rows = []
    with torch.inference_mode():
        for batch in _chunks(samples, cfg.predict.batch_size):
            prompts = [split_turn(processor, prompt_messages(s["messages"])).prompt for s in batch]
            enc = {k: v.to(model.device) for k, v in _encode(processor, prompts, _images(batch)).items()}
            probs = torch.softmax(head_logits(model, enc).float(), dim=-1).cpu().numpy()
            for s, p in zip(batch, probs, strict=True):
                rows.append(_row(s["id"], labels[int(p.argmax())], p, labels, None))
    return pd.DataFrame(rows)


# -- training --------------------------------------------------------------------------------------


class HeadCollator:
    """Prompt-only rows, left-padded as prediction pads them, with `cls_labels` the label indices."""

    def __init__(self, examples: list[dict], processor, max_length: int):
        self.examples, self.processor, self.max_length = examples, processor, max_length

    def __call__(self, items: list[dict]) -> dict:
        from vlmexp.engine.predict import _encode

        rows = [self.examples[int(it["row"])] for it in items]
        batch = _encode(self.processor, [r["prompt"] for r in rows], [r["images"] for r in rows])
        if batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(
                f"a prompt of {batch['input_ids'].shape[1]} tokens exceeds train.max_length="
                f"{self.max_length}; raise it, or shrink images (image.max_pixels / longest_side)"
            )
        batch["cls_labels"] = torch.tensor([r["label_index"] for r in rows])
        return batch


def head_examples(processor, samples: list[dict], labels: list[str]) -> list[dict]:
    from vlmexp.engine.samples import prompt_messages, split_turn

    index = {label: i for i, label in enumerate(labels)}
    out = []
    for s in samples:
        if s.get("label") not in index:
            raise ValueError(f"training sample {s.get('id')!r} has label {s.get('label')!r}, not in {labels}")
        prompt = split_turn(processor, prompt_messages(s["messages"])).prompt
        out.append({"prompt": prompt, "images": list(s["images"]), "label_index": index[s["label"]]})
    return out


def trainer_builder(train_samples: list[dict], labels: list[str]):
    """`trainer.build_trainer`'s signature for head=cls runs: its `examples` (prompt-completion rows) are
    ignored, the rows are `train_samples`' prompts with their label indices."""

    def build(cfg: Config, model, processor, _examples, output_dir, callbacks=(), caches=None, **kw):
        return build_head_trainer(cfg, model, processor, train_samples, labels, output_dir, callbacks, **kw)

    return build


def build_head_trainer(cfg: Config, model, processor, train_samples, labels, output_dir, callbacks=(), **kw):
    """The fold's trainer for head=cls: the project's SFTTrainer settings (checkpoints, trackers,
    validation by EvalCallback), with prompt-only rows and cross-entropy on the head. The speed
    levers of label training (rows encoded once, cached vision features) are not used here."""
    from vlmexp.engine import autobatch
    from vlmexp.engine.train_args import sft_config
    from vlmexp.engine.trainer import _SFTTrainer

    class HeadTrainer(_SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop("cls_labels")
            logits = head_logits(model, inputs)
            loss = nn.functional.cross_entropy(
                logits, target.to(logits.device), label_smoothing=cfg.model.head_label_smoothing
            )
            return (loss, {"logits": logits}) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            save_head(self.model, Path(output_dir or self.args.output_dir))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_head(self.model, resume_from_checkpoint)

        def _load_best_model(self):
            super()._load_best_model()
            load_head(self.model, self.state.best_model_checkpoint)

    examples = head_examples(processor, train_samples, labels)
    # train.batch_size=auto from the longest prompt the config allows (no completion is trained here)
    cfg = autobatch.resolve(cfg, model, None)
    new_head(cfg, model, labels)
    evaluator, run_name, group = kw.get("evaluator"), kw.get("run_name"), kw.get("group", "")
    args = sft_config(
        cfg, output_dir, model, run_name=run_name, group=group, evaluating=evaluator is not None
    )
    trainer = HeadTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"row": list(range(len(examples)))}),
        data_collator=HeadCollator(examples, processor, cfg.train.max_length),
        processing_class=processor,
        callbacks=list(callbacks),
    )
    trainer.evaluator = evaluator
    trainer.lora_bf16_inputs = cfg.speed.lora_bf16_inputs
    return trainer
