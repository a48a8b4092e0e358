"""Checks on rendered prompts and training reasons, run before training to catch waste early.

- `long_prompts`: prompts over the character budget (`prompts.budget`); long prompts cost tokens and
  scored worse in our runs.
- `near_duplicate_share`: reasons copied from one another teach a template, not the image.
- `label_restating_share`: reasons like "This is a cat." add nothing over the label itself.
"""

from __future__ import annotations

import re
import statistics

from vlmexp.prompts.render import Rendered, normalise

# Words that carry no evidence in a reason: "It is clearly a cat" -> only the label is left.
FILLER_WORDS = set(
    "a an the this that these those it its it's is are was be being looks look like seems seem appears "
    "to of as so and clearly obviously definitely probably likely just simply shows show showing depicts "
    "image picture photo screenshot screen page class category label type kind example i think there here "
    "which what one".split()
)
# The same for Chinese, removed as substrings: "这是退款页面" (label 退款页面) -> "".
FILLER_CJK = (
    "这张",
    "这个",
    "这是",
    "图片",
    "截图",
    "一个",
    "显示",
    "属于",
    "类别",
    "明显",
    "是",
    "的",
    "了",
    "张",
)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")


def prompt_length(r: Rendered) -> int:
    """Characters the model reads before answering (system + user)."""
    return len(r.system) + len(r.user)


def long_prompts(rendered: list[Rendered], budget: int) -> list[tuple[int, int]]:
    """(index, length) of each prompt longer than `budget` characters."""
    return [(i, n) for i, r in enumerate(rendered) if (n := prompt_length(r)) > budget]


def prompt_stats(rendered: list[Rendered]) -> dict:
    """{"n": 120, "mean_chars": 412.5, "max_chars": 980} over system + user lengths."""
    lengths = [prompt_length(r) for r in rendered]
    if not lengths:
        return {"n": 0, "mean_chars": 0.0, "max_chars": 0}
    return {"n": len(lengths), "mean_chars": statistics.fmean(lengths), "max_chars": max(lengths)}


def near_duplicate_share(reasons: list[str], threshold: float = 0.9) -> float:
    """Share of non-empty reasons with another reason at cosine similarity >= `threshold`.

    Similarity: TF-IDF over character 3-grams (word-bounded) of the normalised text, so a changed
    word or punctuation mark keeps two copies similar, and CJK works without a word splitter.
    Exact copies count. About 0.2 s for 1,000 reasons (one sparse n x n product).
    """
    texts = [normalise(r) for r in reasons if isinstance(r, str) and normalise(r)]
    if len(texts) < 2:
        return 0.0
    from sklearn.feature_extraction.text import TfidfVectorizer  # here: sklearn costs ~1 s to import

    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3)).fit_transform(texts)  # rows L2-normed
    sims = (vectors @ vectors.T).toarray()
    sims[range(len(texts)), range(len(texts))] = 0.0
    return float((sims >= threshold - 1e-9).any(axis=1).mean())


def _label_pattern(label: str) -> str:
    """Regex for a label as a whole word; CJK labels match as substrings (no spaces in CJK text)."""
    text = re.escape(label)
    start = r"(?<!\w)" if label[:1].isascii() and label[:1].isalnum() else ""
    end = r"(?!\w)" if label[-1:].isascii() and label[-1:].isalnum() else ""
    return start + text + end


def restates_label(reason: str, labels: list[str]) -> bool:
    """True when the reason names a label and, apart from it, holds only filler words.

    "This is a cat." / "It's clearly a refund_page" / "这是退款页面" -> True;
    "A cat: pointed ears and whiskers." / "页面上有退款按钮" (names no label) -> False.
    A reason that names no label never counts (it may be vague, but it does not restate).
    """
    text = normalise(reason)
    names = sorted({normalise(label) for label in labels if normalise(label)}, key=len, reverse=True)
    pattern = "|".join(_label_pattern(n) for n in names)
    if not text or not pattern or not re.search(pattern, text):
        return False
    rest = re.sub(pattern, " ", text).replace("\u2019", "'")  # it’s -> it's
    for word in re.findall(r"[\w']+", rest):
        if _CJK.search(word):
            for filler in FILLER_CJK:
                word = word.replace(filler, "")
            if word:
                return False
        elif word not in FILLER_WORDS:
            return False
    return True


def label_restating_share(reasons: list[str], labels: list[str]) -> float:
    """Share of non-empty reasons that only restate a label (see `restates_label`)."""
    texts = [r for r in reasons if isinstance(r, str) and r.strip()]
    if not texts:
        return 0.0
    return sum(restates_label(r, labels) for r in texts) / len(texts)
