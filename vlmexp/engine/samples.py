"""Competition rows -> model samples, and samples -> the exact text the model trains and predicts on.

A sample is a dict: `id`, `label` (train rows), `images` (PIL, RGB, resized per `cfg.image`),
`messages` (HF multimodal chat) and `rendered` (the `Rendered` prompt parts).

Training and prediction share one text layout, built by `split_turn` from the model's own chat
template: `prompt` (the chat up to the generation prompt, e.g. "...<|im_start|>assistant\\n"), then
`lead + answer + eot`, where `lead` is what the template puts before the answer (" " after SmolVLM's
"Assistant:", "" for Qwen) and `eot` the token that ends the turn ("<|im_end|>" for Qwen; the
tokenizer's EOS "</s>" when the template ends the turn with none, as LLaVA-1.5's does). Training
supervises exactly `lead + answer + eot`, and scoring asks for the likelihood of the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd
from PIL import Image

from vlmexp.config import Config
from vlmexp.data import image_paths, open_image
from vlmexp.prompts.checks import long_prompts
from vlmexp.prompts.render import PromptTemplate, render_sample, to_messages

log = logging.getLogger(__name__)

# Stands in for the answer when only the turn's shape is wanted (prediction has no answer yet).
_SENTINEL = "ANSWER"
# Every chat render takes the non-thinking form of a thinking template. Qwen3.5-4B+'s generation prompt
# otherwise ends "<think>\n": the model's first tokens would be a thought, label scoring right after the
# prompt would score the label as the thought's first word, and training would supervise the
# "\n</think>\n\n" closing an empty thought as part of every answer. Non-thinking, the prompt ends
# "<think>\n\n</think>\n\n" and the answer (a label, or reason_label/cot's "Reason: ...\nLabel: x")
# follows at once, as with every other family. Only templates that read the switch get it (transformers
# warns about a keyword a template does not use).
NON_THINKING = {"enable_thinking": False}


def template_kwargs(processor) -> dict:
    """Extra chat-template keywords for `processor`: {"enable_thinking": False} where its template
    reads that switch (Qwen3.5, Gemma 4), else none."""
    template = getattr(processor, "chat_template", None) or ""
    template = " ".join(template.values()) if isinstance(template, dict) else template
    return dict(NON_THINKING) if "enable_thinking" in template else {}


def resize_image(img: Image.Image, cfg: Config) -> Image.Image:
    """Apply `image.resize` (square, aspect ignored) or `image.longest_side` (downscale only)."""
    if cfg.image.resize > 0:
        side = cfg.image.resize
        return img if img.size == (side, side) else img.resize((side, side), Image.Resampling.BICUBIC)
    longest = cfg.image.longest_side
    if longest > 0 and max(img.size) > longest:
        scale = longest / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        return img.resize(size, Image.Resampling.LANCZOS)
    return img


def load_images(cell: str, cfg: Config) -> list[Image.Image]:
    return [resize_image(open_image(p), cfg) for p in image_paths(cell)]


class ImageMemo:
    """`load_images` once per csv cell for a whole run: every fold's samples then hold the same image
    objects. A fold builds samples of all training rows (its training and validation split), so a
    5-fold run decoded and resized every training image 5 times, and the Encoder, whose content hash
    is remembered per image object (`encode._KeyMemo`), hashed each new object again: 3.9 s of decoding
    and 4.1 s of hashing in a 3B demo run under py-spy (run T, docs/performance.md; py-spy slows CPU
    work). Memory: a fold's samples hold every training image anyway, and the run's test samples every
    test image."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._by_cell: dict[str, list[Image.Image]] = {}

    def __call__(self, cell: str) -> list[Image.Image]:
        if cell not in self._by_cell:
            self._by_cell[cell] = load_images(cell, self.cfg)
        return list(self._by_cell[cell])  # a list of its own per sample; the images are shared


def _ocr_for(cell: str, ocr: dict[str, str] | None) -> str:
    if not ocr:
        return ""
    if cell in ocr:
        return ocr[cell]
    return "\n".join(t for p in image_paths(cell) if (t := ocr.get(p, "")))


def build_samples(
    df: pd.DataFrame,
    *,
    labels: list[str],
    descriptions: dict[str, str],
    template: PromptTemplate,
    cfg: Config,
    ocr: dict[str, str] | None = None,
    with_answer: bool = True,
    tree: dict[str, list[str]] | None = None,
    images: ImageMemo | None = None,
) -> list[dict]:
    """One sample per row of `df` (canonical columns: id, image, label?, reason?...); `tree` is
    `Competition.tree` for two-level labels, which the `hierarchy` prompt shows; `images`: the run's
    ImageMemo (default: every image loaded from disk)."""
    samples = []
    load = images if images is not None else (lambda cell: load_images(cell, cfg))
    for row in df.to_dict(orient="records"):
        row_images = load(row["image"])
        rendered = render_sample(
            template,
            labels=labels,
            descriptions=descriptions,
            row=row,
            ocr_text=_ocr_for(row["image"], ocr),
            with_answer=with_answer,
            tree=tree,
        )
        sample = {
            "id": str(row["id"]),
            "images": row_images,
            "messages": to_messages(rendered, n_images=len(row_images), with_answer=with_answer),
            "rendered": rendered,
        }
        if "label" in row and isinstance(row["label"], str):
            sample["label"] = row["label"]
        samples.append(sample)
    _warn_long_prompts(samples, cfg.prompts.budget)
    return samples


def _warn_long_prompts(samples: list[dict], budget: int) -> None:
    long = long_prompts([s["rendered"] for s in samples], budget)
    if long:
        i, n = long[0]
        log.warning(
            "%d of %d prompts are longer than prompts.budget=%d characters, e.g. sample %s with %d; "
            "long prompts cost tokens and scored worse; shorten the template or descriptions",
            len(long),
            len(samples),
            budget,
            samples[i]["id"],
            n,
        )


@dataclass(frozen=True)
class Turn:
    """One assistant turn laid out by a chat template: prompt + lead + answer + eot."""

    prompt: str  # everything the model reads, ending with the generation prompt
    lead: str  # text the template puts between the generation prompt and the answer, e.g. " "
    eot: str  # end-of-turn token the answer is followed by, e.g. "<|im_end|>"

    def completion(self, answer: str) -> str:
        return self.lead + answer + self.eot


def split_turn(processor, messages: list[dict], answer: str | None = None) -> Turn:
    """Lay out the assistant turn after `messages` (which must end with a user turn).

    Renders the chat with the generation prompt and with an assistant `answer`, and reads the
    lead and the end-of-turn token off the difference, e.g. Qwen:
    "...assistant\\n" vs "...assistant\\nred<|im_end|>\\n" -> lead "", eot "<|im_end|>".
    """
    if messages[-1]["role"] != "user":
        raise ValueError(f"split_turn needs messages ending with a user turn, got {messages[-1]['role']!r}")
    answer = answer or _SENTINEL
    prompt = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **template_kwargs(processor)
    )
    reply = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    full = processor.apply_chat_template([*messages, reply], tokenize=False, **template_kwargs(processor))
    at = full.find(answer, len(prompt))
    if not full.startswith(prompt) or at < 0:
        raise ValueError(
            "the chat template does not render an assistant answer right after its generation prompt "
            f"(prompt ends {prompt[-60:]!r}, full chat ends {full[-80:]!r}); vlmexp needs a template "
            "where prompt + answer is a prefix of the rendered chat"
        )
    lead, tail = full[len(prompt) : at], full[at + len(answer) :]
    # "<|im_end|>\n" -> "<|im_end|>": whitespace after the end-of-turn token belongs to the next turn.
    eot = tail.strip() or processor.tokenizer.eos_token
    if not eot:
        raise ValueError(
            "the chat template ends the assistant turn with no token and the tokenizer has no EOS"
        )
    return Turn(prompt=prompt, lead=lead, eot=eot)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages without a final assistant answer."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def answer_text(messages: list[dict]) -> str:
    """The text of the final assistant message, e.g. "Reason: red tag.\\nLabel: sale"."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def to_prompt_completion(processor, sample: dict) -> dict:
    """{"prompt", "completion", "images"} for trl's prompt-completion VLM collator."""
    messages = sample["messages"]
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"sample {sample.get('id', '?')!r} has no answer; build it with with_answer=True")
    answer = answer_text(messages)
    turn = split_turn(processor, prompt_messages(messages), answer)
    return {"prompt": turn.prompt, "completion": turn.completion(answer), "images": list(sample["images"])}
