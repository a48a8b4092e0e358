"""Is a finished run useless? A run that learned nothing must not look like any other.

A tiny model at the wrong learning rate can answer one class for every image and print
`CV macro_f1 0.0184 ± 0.0002` beside a majority-class baseline of 0.0185. Two checks, both on
the out-of-fold predictions:

- `one_class`: every OOF prediction is the same label.
- `near_majority`: the CV mean is not clearly above always answering the most common training
  label: its margin over that baseline is below max(fold std, 0.02). E.g. CV 0.30 ± 0.05 against
  a baseline of 0.26 is flagged (margin 0.04 < 0.05); CV 0.45 ± 0.03 against 0.26 is not.

The flags go into cv.json (`flag`), the leaderboard row (`flag` column) and a warning in the log.
"""

from __future__ import annotations

from collections.abc import Sequence

# The smallest margin over the majority baseline that counts as learning, whatever the fold std.
MIN_MARGIN = 0.02

ADVICE = (
    "What usually helps: more epochs (train.epochs=6), a higher learning rate for tiny models "
    "(train.lr=1e-3), larger images (image.max_pixels=802816 or image.longest_side=896), "
    "the images' text in the prompt (ocr.enabled=true)"
)


def run_flags(cv_mean: float, cv_std: float, majority: float, oof_preds: Sequence) -> list[str]:
    """The names of the checks a run fails: [], ["near_majority"], ["one_class", "near_majority"], ..."""
    flags = []
    if len({str(p) for p in oof_preds}) <= 1:
        flags.append("one_class")
    if cv_mean - majority < max(cv_std, MIN_MARGIN):
        flags.append("near_majority")
    return flags


def describe(flags: list[str], metric: str, cv_mean: float, cv_std: float, majority: float) -> str:
    """The warning a flagged run prints, with what to try next."""
    why = []
    if "one_class" in flags:
        why.append("every out-of-fold prediction is the same class")
    if "near_majority" in flags:
        why.append(
            f"CV {metric} {cv_mean:.4f} ± {cv_std:.4f} is not clearly above always answering the most "
            f"common class ({majority:.4f}; needs a margin of max(std, {MIN_MARGIN}))"
        )
    return "this run looks useless: " + "; ".join(why) + ". " + ADVICE
