"""Prompt templates: rendering, user overrides, strict variables, answer parsing, prompt checks."""

from __future__ import annotations

import json
import math

import pytest

from vlmexp.prompts import (
    PromptError,
    Rendered,
    answer_prefix_and_label,
    available_templates,
    label_restating_share,
    load_template,
    long_prompts,
    near_duplicate_share,
    parse_answer,
    prompt_stats,
    render_sample,
    to_messages,
)
from vlmexp.prompts.checks import restates_label

SHIPPED = ["baseline", "cot", "describe_classify", "hierarchy", "label_desc", "reason_label"]
LABELS = ["cat", "dog", "退款页面", "sale_page"]
DESCRIPTIONS = {
    "cat": "a small cat",
    "dog": "a dog",
    "退款页面": "退款相关的页面",
    "sale_page": "a shop sale",
}
REASON = "The title reads 退款. A refund button is visible."


def row(label: str = "退款页面", reason: object = REASON, **extra) -> dict:
    return {"id": "img_7", "image": "/data/img_7.png", "label": label, "reason": reason, **extra}


def render(name: str, **kw) -> Rendered:
    kw.setdefault("row", row())
    return render_sample(load_template(name), labels=LABELS, descriptions=DESCRIPTIONS, **kw)


def test_shipped_names_are_listed():
    assert available_templates() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("ocr", ["", "退款 Refund"])
@pytest.mark.parametrize("reason", [REASON, "", None, math.nan])
@pytest.mark.parametrize("label", ["退款页面", "sale_page"])
def test_every_template_renders_and_parses_its_own_answer(name, ocr, reason, label):
    r = render(name, row=row(label, reason), ocr_text=ocr)
    assert r.system and r.user and r.answer
    assert parse_answer(r.answer, LABELS, r.marker) == label
    assert ("OCR" in r.user) == bool(ocr)
    assert (ocr in r.user) if ocr else "Text read" not in r.user
    for lab in LABELS:
        assert lab in r.user
    assert "None" not in r.answer and "nan" not in r.answer
    # Prediction renders the same prompt without the answer: no train/predict mismatch.
    bare = render(name, row=row(label, reason), ocr_text=ocr, with_answer=False)
    assert (bare.system, bare.user, bare.answer) == (r.system, r.user, "")
    assert not r.answer.startswith((" ", "\n")) and not r.user.endswith("\n")


@pytest.mark.parametrize("name", ["reason_label", "cot", "describe_classify"])
def test_reason_comes_before_the_label(name):
    r = render(name)
    assert r.marker == "Label: "
    assert r.answer.endswith("\nLabel: 退款页面")
    assert r.answer.index("refund button") < r.answer.index("Label: ")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("reason_label", "Reason: (none)\nLabel: cat"), ("cot", "Step 1: (none)\nLabel: cat")],
)
def test_reason_variants_without_reason_still_well_formed(name, expected):
    assert render(name, row=row("cat", "")).answer == expected


def test_cot_turns_reason_sentences_into_steps():
    r = render("cot", row=row("cat", "Pointed ears. Whiskers!\n猫的眼睛。很圆"))
    assert (
        r.answer == "Step 1: Pointed ears.\nStep 2: Whiskers!\nStep 3: 猫的眼睛。\nStep 4: 很圆\nLabel: cat"
    )


def test_describe_classify_prefers_a_description_column():
    r = render("describe_classify", row=row("dog", "short reason", description="A brown dog on grass."))
    assert r.answer == "Description: A brown dog on grass.\nLabel: dog"


def test_label_only_variants_answer_the_label_alone():
    for name in ["baseline", "label_desc"]:
        r = render(name)
        assert (r.marker, r.answer) == ("", "退款页面")


def test_label_desc_has_unescaped_cjk_json_in_class_order():
    r = render("label_desc")
    assert '"退款页面": "退款相关的页面"' in r.user and "\\u" not in r.user
    start = r.user.index("{")
    blob = r.user[start : r.user.index("}", start) + 1]
    assert list(json.loads(blob).items()) == list(DESCRIPTIONS.items())


def test_without_answer_nothing_needs_a_label():
    r = render("reason_label", row={"id": "t1", "image": "/t1.png"}, with_answer=False)
    assert r.answer == "" and r.marker == "Label: " and "Label:" in r.user


def test_unknown_label_in_row_fails_loud():
    with pytest.raises(PromptError, match="'horse' is not one of the 4 labels"):
        render("baseline", row=row("horse"))


def test_ocr_and_reason_text_stay_literal():
    r = render("reason_label", row=row(reason="see {{ 7*7 }} and {% if x %}"), ocr_text="total {{ 7*7 }}")
    assert "total {{ 7*7 }}" in r.user and "49" not in r.user
    assert "see {{ 7*7 }} and {% if x %}" in r.answer and "49" not in r.answer


def test_unknown_template_lists_available():
    with pytest.raises(
        PromptError, match="available: baseline, cot, describe_classify, hierarchy, label_desc, reason_label"
    ):
        load_template("label_dsec")


def test_user_dir_adds_and_overrides(tmp_path):
    (tmp_path / "mine.jinja").write_text(
        '{% extends "label_desc.jinja" %}{% set marker = "Answer: " %}'
        "{% block answer %}{{ marker }}{{ label }}{% endblock %}",
        encoding="utf-8",
    )
    (tmp_path / "baseline.jinja").write_text(
        '{% extends "shipped/baseline.jinja" %}{% block system %}My own system.{% endblock %}',
        encoding="utf-8",
    )
    assert "mine" in available_templates(str(tmp_path))
    mine = load_template("mine", str(tmp_path))
    r = render_sample(mine, labels=LABELS, descriptions=DESCRIPTIONS, row=row("dog"))
    # mine -> label_desc -> the user's baseline -> the shipped baseline: every level takes part.
    assert (r.system, r.answer, r.marker) == ("My own system.", "Answer: dog", "Answer: ")
    assert '"dog": "a dog"' in r.user
    assert set(mine.sources) == {"mine.jinja", "label_desc.jinja", "baseline.jinja", "shipped/baseline.jinja"}
    assert mine.source.startswith('{% extends "label_desc.jinja" %}')
    base = render_sample(load_template("baseline", str(tmp_path)), labels=LABELS, descriptions={}, row=row())
    assert base.system == "My own system." and base.answer == "退款页面"


def test_self_extending_override_is_explained(tmp_path):
    (tmp_path / "baseline.jinja").write_text('{% extends "baseline.jinja" %}', encoding="utf-8")
    with pytest.raises(PromptError, match='extends "shipped/baseline.jinja"'):
        load_template("baseline", str(tmp_path))


def test_undefined_variable_names_template_and_variable(tmp_path):
    (tmp_path / "typo.jinja").write_text(
        '{% extends "baseline.jinja" %}{% block user %}Pick one of {{ lables }}{% endblock %}',
        encoding="utf-8",
    )
    with pytest.raises(PromptError) as e:
        render_sample(load_template("typo", str(tmp_path)), labels=LABELS, descriptions={}, row=row())
    msg = str(e.value)
    assert "'typo'" in msg and "typo.jinja" in msg and "'lables' is undefined" in msg
    assert "labels" in msg and "{% if NAME is defined %}" in msg


def test_gold_label_is_not_visible_in_the_prompt(tmp_path):
    (tmp_path / "leak.jinja").write_text(
        '{% extends "baseline.jinja" %}{% block user %}Hint: {{ label }}{% endblock %}', encoding="utf-8"
    )
    with pytest.raises(PromptError, match="exists in the answer block only"):
        render_sample(load_template("leak", str(tmp_path)), labels=LABELS, descriptions={}, row=row())
    (tmp_path / "cols.jinja").write_text(
        '{% extends "baseline.jinja" %}{% block user %}{{ row | tojson }}|{{ image }}{% endblock %}',
        encoding="utf-8",
    )
    r = render_sample(load_template("cols", str(tmp_path)), labels=LABELS, descriptions={}, row=row())
    row_json, image = r.user.split("|")
    assert json.loads(row_json) == {"id": "img_7", "image": "/data/img_7.png"} and image == "/data/img_7.png"


def test_top_level_code_and_missing_pieces_fail_at_load(tmp_path):
    (tmp_path / "toplevel.jinja").write_text(
        '{% extends "baseline.jinja" %}{% set hint = "x" %}', encoding="utf-8"
    )
    with pytest.raises(PromptError, match=r"toplevel.jinja:1: only .* may stand outside a block"):
        load_template("toplevel", str(tmp_path))
    (tmp_path / "bare.jinja").write_text("{% block user %}hi{% endblock %}", encoding="utf-8")
    with pytest.raises(PromptError, match=r"defines no block\(s\) system, answer and no \{% set marker"):
        load_template("bare", str(tmp_path))


def test_to_messages_structure():
    r = render("reason_label")
    msgs = to_messages(r, n_images=2)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": r.user}]
    assert msgs[2]["content"] == [{"type": "text", "text": r.answer}]
    no_system = Rendered(system="", user="u", answer="", marker="")
    assert to_messages(no_system, with_answer=False) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "u"}]}
    ]
    with pytest.raises(PromptError, match="needs an answer"):
        to_messages(no_system)


def test_answer_prefix_and_label():
    r = render("reason_label")
    prefix, label = answer_prefix_and_label(r)
    assert (prefix, label) == (f"Reason: {REASON}\nLabel: ", "退款页面")
    assert prefix + label == r.answer
    assert answer_prefix_and_label(render("baseline", row=row("cat"))) == ("", "cat")
    with pytest.raises(PromptError, match="must end with marker"):
        answer_prefix_and_label(Rendered("s", "u", "Label: cat\nthanks", "Label: ", "cat"))
    with pytest.raises(PromptError, match="has no marker"):
        answer_prefix_and_label(Rendered("s", "u", "cat", "Label: ", "cat"))


@pytest.mark.parametrize(
    ("text", "marker", "expected"),
    [
        ("Reason: Label: dog is wrong here\nLabel: cat", "Label: ", "cat"),  # the last marker wins
        ("Reason: fur.\nlabel:CAT.", "Label: ", "cat"),  # marker case/space, label case, period
        ('Label: "Sale Page"', "Label: ", "sale_page"),  # quotes, underscores vs spaces
        ("Label: **退款页面**。", "Label: ", "退款页面"),  # markdown bold, CJK full stop
        ("Label: ｃａｔ", "Label: ", "cat"),  # full-width letters via NFKC
        ("Label: cat\nI am sure.", "Label: ", "cat"),  # first line after the marker
        ("  dog \n", "", "dog"),  # no marker: the whole text
        ("Label: horse", "Label: ", None),  # not a label: never mapped to the nearest
        ("Label: ca", "Label: ", None),
        ("The answer is cat", "", None),
        ("Reason: cat-like.", "Label: ", None),  # no marker at all
        ("Label: ", "Label: ", None),
        ("", "", None),
    ],
)
def test_parse_answer(text, marker, expected):
    assert parse_answer(text, LABELS, marker) == expected


def test_parse_answer_ambiguous_normalised_match_is_none():
    labels = ["Sale Page", "sale_page", "Cat"]
    assert parse_answer("sale_page", labels, "") == "sale_page"  # exact still wins
    assert parse_answer("SALE PAGE", labels, "") is None  # matches two labels once normalised
    assert parse_answer("cat", labels, "") == "Cat"


def test_long_prompts_and_stats():
    short, long = Rendered("sys", "u" * 10, "", ""), Rendered("s" * 50, "u" * 60, "", "")
    assert long_prompts([short, long, short], budget=100) == [(1, 110)]
    assert long_prompts([short, long], budget=110) == []
    assert prompt_stats([short, long]) == {"n": 2, "mean_chars": 61.5, "max_chars": 110}
    assert prompt_stats([])["n"] == 0
    big = render("label_desc", ocr_text="x" * 3000)
    assert long_prompts([big], budget=2500) == [(0, len(big.system) + len(big.user))]


def test_near_duplicate_share():
    reasons = [
        "The screen shows a red refund button at the top.",
        "the screen shows a red refund button at the top!",  # near copy of the first
        "A cat sleeping on a sofa next to a window.",
        "Green price tags and a countdown banner for the sale.",
        "",  # empty: not counted
        "页面标题是退款申请，下方有提交按钮。",
        "页面标题是退款申请，下方有提交按钮",  # near copy (no final full stop)
    ]
    assert near_duplicate_share(reasons) == pytest.approx(4 / 6)
    assert near_duplicate_share(reasons[2:4]) == 0.0
    assert near_duplicate_share(["same", "same", "other text entirely"]) == pytest.approx(2 / 3)
    assert near_duplicate_share(["only one"]) == 0.0
    # A lower threshold catches looser paraphrases the default leaves alone.
    para = ["A red refund button at the top of the screen.", "The top of the screen has a red refund button."]
    assert near_duplicate_share(para) == 0.0
    assert near_duplicate_share(para, threshold=0.5) == 1.0


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("This is a cat.", True),
        ("It's clearly a Sale Page", True),
        ("cat", True),
        ("Looks like a dog", True),
        ("这是退款页面。", True),
        ("A cat: pointed ears and whiskers.", False),
        ("页面上有退款按钮", False),  # no label named
        ("The category menu is open", False),  # "cat" inside "category" is not the label
        ("This is a dog, not a cat, because of the snout", False),
    ],
)
def test_restates_label(reason, expected):
    assert restates_label(reason, LABELS) is expected


def test_label_restating_share():
    reasons = ["This is a cat.", "Red sale banner with prices.", "", "dog", "这是退款页面"]
    assert label_restating_share(reasons, LABELS) == pytest.approx(3 / 4)
    assert label_restating_share(["", "  "], LABELS) == 0.0
