"""Test-time augmentation: one identity view equals plain prediction (tiny model); views keep text
legible (no flips); the recipe's prediction averages the views' probabilities."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmexp.config import Config, load_config
from vlmexp.engine import tta
from vlmexp.engine.predict import predict
from vlmexp.engine.samples import build_samples
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns

LABELS = ["red", "blue", "退款页面"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("tta")
    rng = np.random.default_rng(0)
    rows = []
    for i, (w, h) in enumerate([(64, 48), (90, 70), (40, 40)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"id": f"s{i}", "image": str(d / f"{i}.png")})
    return build_samples(
        pd.DataFrame(rows), labels=LABELS, descriptions={}, template=load_template("baseline"), cfg=Config(),
        with_answer=False,
    )  # fmt: skip


def test_one_identity_view_equals_plain_prediction(tiny_models, samples):
    path = tiny_models("qwen2_vl")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    cfg = Config()

    def plain(s):
        return predict(cfg, model, processor, s, LABELS, progress=False)

    want = plain(samples)
    got = tta.predict_views(samples, LABELS, [tta.identity], plain)
    assert got["pred"].tolist() == want["pred"].tolist()
    np.testing.assert_array_equal(got[prob_columns(LABELS)].to_numpy(), want[prob_columns(LABELS)].to_numpy())
    # A real second view changes the probabilities (else the test above could not tell views apart).
    scaled = tta.predict_views(samples, LABELS, [tta.identity, tta.scale(0.5)], plain)
    assert not np.allclose(scaled[prob_columns(LABELS)].to_numpy(), want[prob_columns(LABELS)].to_numpy())


def test_views_scale_and_crop_without_flipping():
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))  # top-left marker
    img.putpixel((99, 49), (0, 0, 255))  # bottom-right marker
    assert [v(img).size for v in tta.views("scales")] == [(100, 50), (90, 45), (110, 55)]
    tl, br = tta.crop("tl")(img), tta.crop("br")(img)
    assert tl.size == br.size == (92, 46)
    assert tl.getpixel((0, 0)) == (255, 0, 0) and br.getpixel((91, 45)) == (0, 0, 255)
    assert tta.views("none") == [tta.identity]
    with pytest.raises(ValueError, match="flips"):
        tta.views("flips")


def test_recipe_prediction_averages_the_views(monkeypatch, samples):
    # A stand-in model: p(red) is the image's width / 200, so each view gives another probability.
    from vlmexp import recipe

    widths = []

    def fake_predict(cfg, model, processor, batch, labels, progress=False, caches=None):
        assert cfg.predict.tta == "none"  # every view is predicted plainly, once
        w = np.array([s["images"][0].size[0] for s in batch]) / 200
        widths.append([s["images"][0].size[0] for s in batch])
        p = np.stack([w, 1 - w, np.zeros_like(w)], axis=1)
        df = pd.DataFrame({"id": [s["id"] for s in batch], "pred": "red"})
        df[prob_columns(labels)] = p
        return df

    monkeypatch.setattr(recipe, "predict", fake_predict)
    cfg = load_config(["predict.tta=scales"])
    out = recipe._predict(cfg, None, None, samples, LABELS)
    assert widths == [[64, 90, 40], [58, 81, 36], [70, 99, 44]]
    assert out["p:red"].tolist() == pytest.approx(np.mean(widths, axis=0) / 200)
    assert out["pred"].tolist() == ["blue", "blue", "blue"]  # argmax of the mean, not the fakes' "red"
    plain = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, tta="none"))
    widths.clear()
    recipe._predict(plain, None, None, samples, LABELS)
    assert len(widths) == 1
