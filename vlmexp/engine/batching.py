"""Batching helpers for encoded rows: padding per-token tensors to one width, appending token ids,
trl's collator with the project's settings, the model's M-RoPE builder, and whether rows can share a
batch. `encode.Encoder` keeps single rows; these turn them (or a processor batch) into model batches."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Per-token tensors the processor and trl's collator return beside input_ids, with their pad values.
_PAD = {"attention_mask": 0, "labels": -100, "mm_token_type_ids": 0, "token_type_ids": 0}


def trl_collator(processor, max_length: int):
    """trl's prompt-completion VLM collator with the project's settings (answer-only labels)."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    return DataCollatorForVisionLanguageModeling(processor, max_length=max_length, completion_only_loss=True)


def _tokens(enc: dict, b: int) -> dict:
    """Row b's per-token tensors, real tokens only (the attention mask's ones)."""
    real = enc["attention_mask"][b].bool()
    return {k: v[b][real] for k, v in enc.items() if k == "input_ids" or k in _PAD}


def append_ids(row: dict, extra: list[int]) -> dict:
    """A row's per-token tensors with `extra` ids appended (attention 1, token types 0: text)."""
    out = {}
    for k, v in row.items():
        fill = extra if k == "input_ids" else [1 if k == "attention_mask" else 0] * len(extra)
        out[k] = torch.cat([v, torch.tensor(fill, dtype=v.dtype)])
    return out


def append_left_padded(enc: dict, extra: list[list[int]], pad_id: int) -> dict:
    """A left-padded batch with `extra[b]` appended to row b's real tokens, left-padded again."""
    rows = [append_ids(_tokens(enc, b), e) for b, e in enumerate(extra)]
    return enc | pad_rows(rows, pad_id, left=True)


def pad_rows(rows: list[dict], pad_id: int, left: bool, multiple: int | Callable[[int], int] = 1) -> dict:
    """Per-token tensors of `rows` padded to one width (a multiple of `multiple`), on the left or the
    right: input_ids with `pad_id`, the others with their `_PAD` value; 3D positions with 0."""
    width = max(len(r["input_ids"]) for r in rows)
    # A rule instead of a multiple, e.g. buckets.bucket_width: 570 -> 640 (speed.compile's few shapes).
    width = multiple(width) if callable(multiple) else -(-width // multiple) * multiple

    def cols(n: int) -> slice:
        return slice(width - n, width) if left else slice(0, n)

    out = {}
    for name in ("input_ids", *_PAD):
        if name in rows[0]:
            fill = pad_id if name == "input_ids" else _PAD[name]
            t = torch.full((len(rows), width), fill, dtype=rows[0][name].dtype)
            for b, r in enumerate(rows):
                t[b, cols(len(r[name]))] = r[name]
            out[name] = t
    if "position_ids" in rows[0]:  # padding gets position 0, as get_rope_index leaves it
        pos = torch.zeros((3, len(rows), width), dtype=rows[0]["position_ids"].dtype)
        for b, r in enumerate(rows):
            pos[:, b, cols(r["position_ids"].shape[1])] = r["position_ids"]
        out["position_ids"] = pos
    return out


def rope_index_fn(model):
    """The model's M-RoPE position builder (Qwen2/2.5/3-VL `get_rope_index`), or None for 1D RoPE."""
    for module in model.modules():
        fn = getattr(module, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


def stackable(rows: list[dict]) -> bool:
    """Whether `Encoder.pad_*` can batch these rows: media tensors that agree beyond the first dim."""
    first = rows[0].get("media") or {}
    for r in rows:
        media = r.get("media") or {}
        if ("image_grid_thw" in r) != ("image_grid_thw" in rows[0]) or media.keys() != first.keys():
            return False
        if bool(r.get("per_image")) != bool(rows[0].get("per_image")):
            return False
        if any(media[k].shape[1:] != first[k].shape[1:] for k in media):
            return False
    return True
