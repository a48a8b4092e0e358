"""Synthetic classification samples of a chosen image size and prompt length, and their batches.

Samples are in the trl format the engine uses (`messages` + `images`), so the reference recipe (trl) and
the project's path see the same data. Images are random noise: speed does not depend on content.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmexp.prompts.render import Rendered

FILLER = "Classify the image. Answer with one label from the list below. Labels: "


def labels(n: int) -> list[str]:
    return [f"class_{i:02d}" for i in range(n)]


def _messages(prompt: str, answer: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def image_tokens(processor, resolution: int) -> int:
    ip = processor.image_processor
    return (resolution // ip.patch_size) ** 2 // ip.merge_size**2


def make_prompt(processor, resolution: int, tokens: int, label_names: list[str]) -> str:
    """A prompt whose full training sample (template + image + prompt + answer) is ~`tokens` tokens."""
    tok = processor.tokenizer
    words = FILLER + ", ".join(label_names) + ". "
    prompt = words
    budget = tokens - image_tokens(processor, resolution) + 1  # the template holds one <|image_pad|>

    def length(p: str) -> int:
        text = processor.apply_chat_template(_messages(p, label_names[0]), tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    while length(prompt) < budget:
        prompt += words
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    over = length(prompt) - budget
    return tok.decode(ids[: len(ids) - over]) if over > 0 else prompt


def make_samples(
    processor, n: int, resolution: int, tokens: int, n_labels: int = 25, seed: int = 0
) -> list[dict]:
    rng = np.random.default_rng(seed)
    names = labels(n_labels)
    prompt = make_prompt(processor, resolution, tokens, names)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        label = names[int(rng.integers(n_labels))]
        out.append(
            {
                "id": f"s{i}",
                "messages": _messages(prompt, label),
                "images": [Image.fromarray(pixels)],
                "label": label,
                # what engine.predict reads besides messages/images: no reasoning marker
                "rendered": Rendered(system="", user=prompt, answer=label, marker="", label=label),
            }
        )
    return out


def collate_train(processor, samples: list[dict]) -> dict:
    """Right-padded batch with labels on the assistant turn only: the answer, "<|im_end|>" and the
    template's "\n" after it, the same tokens trl's assistant_only_loss supervises."""
    tok = processor.tokenizer
    full = [processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
    prompts = [
        processor.apply_chat_template(s["messages"][:-1], tokenize=False, add_generation_prompt=True)
        for s in samples
    ]
    tok.padding_side = "right"
    batch = processor(text=full, images=[s["images"] for s in samples], padding=True, return_tensors="pt")
    prompt_batch = processor(
        text=prompts, images=[s["images"] for s in samples], padding=True, return_tensors="pt"
    )
    n_prompt = prompt_batch["attention_mask"].sum(1)
    labels = batch["input_ids"].clone()
    pos = torch.arange(labels.shape[1])[None]
    labels[(pos < n_prompt[:, None]) | (batch["attention_mask"] == 0)] = -100
    return {**batch, "labels": labels}


def collate_prompts(processor, samples: list[dict]) -> dict:
    """Left-padded prompts ending in the generation prompt, for generation and scoring."""
    tok = processor.tokenizer
    prompts = [
        processor.apply_chat_template(s["messages"][:1], tokenize=False, add_generation_prompt=True)
        for s in samples
    ]
    tok.padding_side = "left"
    try:
        return dict(
            processor(text=prompts, images=[s["images"] for s in samples], padding=True, return_tensors="pt")
        )
    finally:
        tok.padding_side = "right"


def candidate_ids(processor, label_names: list[str]) -> list[list[int]]:
    """Token ids of each label's answer: the label, then the end-of-turn token."""
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    return [tok(name, add_special_tokens=False)["input_ids"] + [eot] for name in label_names]
