"""Test-time augmentation (`predict.tta`): each image seen in a few views that keep its text legible,
the label probabilities averaged over the views.

No flips: a mirrored screenshot's text is no longer text. The views, each including the image itself:
- scales: the image at 0.9x and 1.1x its size too (the processor sees fewer / more patches);
- crops: its top-left and bottom-right 92% crops too (a border element moves, the text stays whole).

Every view costs one more prediction pass, so `predict_views` logs the seconds per image with and
without the extra views (e.g. "3 views: 0.084 s per image, 0.027 s for the image alone").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from PIL import Image

from vlmexp.tables import prob_columns, probs

log = logging.getLogger(__name__)

View = Callable[[Image.Image], Image.Image]
CROP = 0.92  # share of each side a crop keeps: a 1000 px screenshot loses 80 px on two sides


def identity(img: Image.Image) -> Image.Image:
    return img


def scale(factor: float) -> View:
    def view(img: Image.Image) -> Image.Image:
        w, h = img.size
        return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)

    return view


def crop(corner: str) -> View:
    """corner "tl" keeps the top-left CROP share of each side, "br" the bottom-right."""

    def view(img: Image.Image) -> Image.Image:
        w, h = img.size
        cw, ch = max(1, round(w * CROP)), max(1, round(h * CROP))
        x, y = (0, 0) if corner == "tl" else (w - cw, h - ch)
        return img.crop((x, y, x + cw, y + ch))

    return view


VIEWS: dict[str, list[View]] = {
    "none": [identity],
    "scales": [identity, scale(0.9), scale(1.1)],
    "crops": [identity, crop("tl"), crop("br")],
}


def views(how: str) -> list[View]:
    if how not in VIEWS:
        raise ValueError(f"predict.tta={how!r}; choose one of {', '.join(VIEWS)}")
    return VIEWS[how]


def _view_samples(samples: list[dict], view: View) -> list[dict]:
    if view is identity:
        return samples
    return [{**s, "images": [view(img) for img in s["images"]]} for s in samples]


def predict_views(
    samples: list[dict],
    labels: list[str],
    view_fns: list[View],
    predict_fn: Callable[[list[dict]], pd.DataFrame],
) -> pd.DataFrame:
    """`predict_fn` (samples -> id, pred, p:<label> table) on every view of the samples; returns the
    first view's table with the mean probabilities and pred = their argmax (None where no view gave
    any probability, e.g. generate mode failing to parse in every view)."""
    tables, seconds = [], []
    for view in view_fns:
        t0 = time.perf_counter()
        tables.append(predict_fn(_view_samples(samples, view)))
        seconds.append(time.perf_counter() - t0)
    ids = tables[0]["id"].astype(str).to_numpy()
    for t in tables[1:]:
        if not np.array_equal(t["id"].astype(str).to_numpy(), ids):
            raise RuntimeError("prediction of a TTA view returned other rows than the image itself")
    mean = np.mean([probs(t, labels) for t in tables], axis=0)
    out = tables[0].copy()
    out[prob_columns(labels)] = mean
    best = np.array(labels, dtype=object)[np.argmax(mean, axis=1)]
    out["pred"] = np.where(mean.max(axis=1) > 0, best, None)
    n = max(1, len(samples))
    log.info(
        "TTA: %d views, %.3f s per image (%.3f s for the image alone)",
        len(view_fns),
        sum(seconds) / n,
        seconds[0] / n,
    )
    return out


def predict_tta(
    samples: list[dict], labels: list[str], how: str, predict_fn: Callable[[list[dict]], pd.DataFrame]
) -> pd.DataFrame:
    """`predict.tta=how` around any prediction function, e.g. recipe._predict without TTA."""
    return predict_views(samples, labels, views(how), predict_fn)
