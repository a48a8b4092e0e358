"""Synthetic classification samples of a chosen image size and prompt length, and their batches.

Samples are in the trl format the engine uses (`messages` + `images`), so the reference recipe (trl) and
the project's path see the same data. Images are random noise: speed does not depend on content.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmexp.engine.samples import split_turn
from vlmexp.prompts.render import Rendered

FILLER = "Classify the image. Answer with one label from the list below. Labels: "


def labels(n: int) -> list[str]:
    return [f"class_{i:02d}" for i in range(n)]


def _messages(prompt: str, answer: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _probe_image(resolution: int) -> Image.Image:
    return Image.fromarray(np.zeros((resolution, resolution, 3), dtype=np.uint8))


def image_tokens(processor, resolution: int) -> int:
    """Image tokens the model reads for one image, counted in a processed sample, e.g. 256 for Qwen2.5-VL
    at 448 px (32x32 patches merged 2x2) and for Gemma 3 (4096 patches pooled to 256 soft tokens)."""
    text = processor.apply_chat_template(_messages("x", None), tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[[_probe_image(resolution)]])["input_ids"][0]
    return sum(int(i) in processor.image_token_ids for i in ids)


def _image_expansion(processor, resolution: int) -> int:
    """Tokens one image adds to a sample beyond its placeholder in the rendered chat: Qwen expands one
    <|image_pad|> to 256 (+255), Gemma 3 one <start_of_image> to "\n\n", it, 256 soft tokens,
    <end_of_image> and "\n\n" (+261); measured, so every family's layout is counted."""
    text = processor.apply_chat_template(_messages("x", None), tokenize=False, add_generation_prompt=True)
    processed = processor(text=[text], images=[[_probe_image(resolution)]])["input_ids"][0]
    return len(processed) - len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def make_prompt(processor, resolution: int, tokens: int, label_names: list[str]) -> str:
    """A prompt whose full training sample (template + image + prompt + answer) is ~`tokens` tokens."""
    tok = processor.tokenizer
    words = FILLER + ", ".join(label_names) + ". "
    prompt = words
    budget = tokens - _image_expansion(processor, resolution)

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
    """Right-padded batch with labels on the assistant turn only: the answer, the end-of-turn token
    ("<|im_end|>", "<end_of_turn>") and the template's "\n" after it, the tokens trl's
    assistant_only_loss supervises."""
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
    """Token ids of each label's answer: the label, then the template's end-of-turn token, read off a
    rendered assistant turn (Qwen "<|im_end|>", Gemma 3 "<end_of_turn>")."""
    tok = processor.tokenizer
    turn = split_turn(processor, _messages("x", None))
    return [tok(turn.completion(name), add_special_tokens=False)["input_ids"] for name in label_names]
