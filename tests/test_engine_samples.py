"""engine/samples.py: rows -> samples (images, messages), and the prompt/completion text layout."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
from PIL import Image
from transformers import AutoProcessor

from vlmexp.config import Config
from vlmexp.data import DataError
from vlmexp.engine.samples import build_samples, split_turn, template_kwargs, to_prompt_completion
from vlmexp.prompts.render import load_template

LABELS = ["red", "green"]
DESCRIPTIONS = {"red": "a red picture", "green": "a green picture"}


def _png(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def table(tmp_path):
    a = _png(tmp_path / "a.png", (200, 100), (200, 0, 0))
    b = _png(tmp_path / "b.png", (50, 80), (0, 200, 0))
    c = _png(tmp_path / "c.png", (64, 64), (0, 0, 200))
    return pd.DataFrame(
        [
            {"id": "1", "image": a, "label": "red", "reason": "mostly red."},
            {"id": "2", "image": f"{b}|{c}", "label": "green", "reason": "green first."},
        ]
    )


def _samples(table, cfg=None, prompt="baseline", **kw):
    return build_samples(
        table,
        labels=LABELS,
        descriptions=DESCRIPTIONS,
        template=load_template(prompt),
        cfg=cfg or Config(),
        **kw,
    )


def test_one_sample_per_row_with_images_messages_and_answer(table):
    s1, s2 = _samples(table, ocr={table.loc[0, "image"]: "SALE 50%"})
    assert (s1["id"], s1["label"], s2["label"]) == ("1", "red", "green")
    assert [im.size for im in s1["images"]] == [(200, 100)]
    assert all(im.mode == "RGB" for im in s1["images"] + s2["images"])
    # multi-image row: both images, and one image slot per image before the text
    assert [im.size for im in s2["images"]] == [(50, 80), (64, 64)]
    user = next(m for m in s2["messages"] if m["role"] == "user")
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert s1["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    assert "SALE 50%" in s1["rendered"].user and "SALE 50%" not in s2["rendered"].user


def test_without_answer_there_is_no_assistant_turn(table):
    s1, _ = _samples(table, with_answer=False)
    assert [m["role"] for m in s1["messages"]] == ["system", "user"]
    assert s1["rendered"].answer == ""


def test_images_are_resized_per_config(table):
    cfg = Config()
    cfg.image.longest_side = 100
    s1, s2 = _samples(table, cfg)
    # downscaled keeping the aspect ratio; never upscaled (64 px stays 64)
    assert [im.size for im in s1["images"] + s2["images"]] == [(100, 50), (50, 80), (64, 64)]
    cfg.image.resize = 32
    s1, s2 = _samples(table, cfg)
    assert {im.size for im in s1["images"] + s2["images"]} == {(32, 32)}


def test_long_prompts_are_reported(table, caplog):
    cfg = Config()
    cfg.prompts.budget = 50
    with caplog.at_level(logging.WARNING):
        _samples(table, cfg)
    assert "2 of 2 prompts are longer than prompts.budget=50" in caplog.text
    caplog.clear()
    cfg.prompts.budget = 100_000
    with caplog.at_level(logging.WARNING):
        _samples(table, cfg)
    assert "prompts.budget" not in caplog.text


def test_missing_image_fails_loud(table, tmp_path):
    table.loc[0, "image"] = str(tmp_path / "gone.png")
    with pytest.raises(DataError, match="gone.png"):
        _samples(table)


# What each family's template puts between the generation prompt and the answer, and after it.
LAYOUT = {
    "qwen2_vl": ("", "<|im_end|>"),
    "qwen2_5_vl": ("", "<|im_end|>"),
    "smolvlm": (" ", "<end_of_utterance>"),
    "llava": (" ", "</s>"),  # LLaVA-1.5's template ends the turn with nothing: the EOS ends it
    "qwen3_vl": ("", "<|im_end|>"),
    "qwen3_5": ("", "<|im_end|>"),  # non-thinking: the empty think block ends the prompt
    "gemma3": ("", "<end_of_turn>"),
    "gemma4": ("", "<turn|>"),
}


@pytest.mark.parametrize("family", sorted(LAYOUT))
def test_prompt_completion_layout_follows_the_chat_template(family, tiny_models, table):
    processor = AutoProcessor.from_pretrained(tiny_models(family))
    sample = _samples(table, prompt="reason_label")[1]
    row = to_prompt_completion(processor, sample)
    answer = "Reason: green first.\nLabel: green"
    lead, eot = LAYOUT[family]
    assert row["completion"] == lead + answer + eot
    assert row["images"] == sample["images"]
    # the prompt is exactly what prediction renders (generation prompt included) ...
    prompt_only = processor.apply_chat_template(
        sample["messages"][:-1], add_generation_prompt=True, tokenize=False, **template_kwargs(processor)
    )
    assert row["prompt"] == prompt_only
    # ... and prompt + completion is the template's own rendering of the whole chat, up to the turn's end
    full = processor.apply_chat_template(sample["messages"], tokenize=False, **template_kwargs(processor))
    assert full.startswith(row["prompt"] + lead + answer)
    if family != "llava":  # LLaVA's template writes no end-of-turn token: the EOS stands in
        assert full.startswith(row["prompt"] + row["completion"])
    turn = split_turn(processor, sample["messages"][:-1])
    assert (turn.prompt, turn.lead, turn.eot) == (row["prompt"], lead, eot)
