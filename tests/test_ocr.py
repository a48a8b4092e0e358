"""OCR on rendered text: words recovered, reading order, per-image-hash cache and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from vlmexp.config import DataConfig, OcrConfig
from vlmexp.ocr import (
    OcrError,
    cut_text,
    ocr_images,
    ocr_records,
    ocr_text_for,
    reading_order,
    run_ocr_on_competition,
)
from vlmexp.ocr import reader as reader_mod
from vlmexp.ocr.cache import cache_path, file_hash

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
# Installed by `apt-get install fonts-wqy-microhei`; without it rendered CJK becomes boxes.
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"


def render(path: Path, items: list[tuple[int, int, str]], size: int = 24, font: str = DEJAVU) -> Path:
    """A 400x300 white image with each (x, y, text) drawn in near-black."""
    img = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(img)
    face = ImageFont.truetype(font, size)
    for x, y, text in items:
        draw.text((x, y), text, fill=(20, 20, 20), font=face)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ocr_images")
    return {
        "refund": render(
            d / "refund.png",
            [(20, 20, "Refund request"), (20, 80, "Order details"), (20, 140, "Total: 59.90")],
        ),
        # The top line starts right of the bottom one: sorting by x alone would put "Welcome" first.
        "order": render(d / "order.png", [(200, 30, "Checkout"), (20, 130, "Welcome back")]),
        "row": render(d / "row.png", [(20, 60, "Name:"), (240, 62, "Alice")]),
        "blank": render(d / "blank.png", []),
    }


def _cfg(tmp_path: Path, cache: str = "cache", **kw) -> OcrConfig:
    return OcrConfig(cache_dir=str(tmp_path / cache), **kw)


@pytest.fixture
def count_reads(monkeypatch) -> list[str]:
    """Paths the in-process reader was asked to read (workers=1 reads in this process)."""
    seen: list[str] = []
    real = reader_mod.read_image

    def counting(engine, path):
        seen.append(path)
        return real(engine, path)

    monkeypatch.setattr(reader_mod, "read_image", counting)
    return seen


def test_reads_rendered_english_words_in_reading_order(images, tmp_path):
    texts = ocr_images(
        [str(images["refund"]), str(images["order"]), str(images["row"])],
        _cfg(tmp_path),
        workers=1,
        progress=False,
    )
    refund = texts[str(images["refund"])]
    assert refund.count("\n") == 2, refund  # three lines of text -> three lines out
    squashed = refund.lower().replace(" ", "")
    assert "refundrequest" in squashed and "orderdetails" in squashed and "total:59.90" in squashed
    assert "refund request" in refund.lower()  # the chosen detector settings keep word spaces
    assert refund.lower().index("refund") < refund.lower().index("order") < refund.lower().index("59.90")
    order = texts[str(images["order"])].lower()
    assert order.index("checkout") < order.index("welcome")
    # Two boxes 200 px apart on one row come out as one line, left box first.
    assert texts[str(images["row"])].replace(" ", "").lower() == "name:alice"


def test_reading_order_groups_boxes_into_lines():
    def box(x, y, text, h=20, w=60):
        return {"text": text, "conf": 0.99, "box": [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]}

    # Shuffled; "b" sits 3 px lower than "a" on the same row; "c" is the next row but further left.
    lines = [box(200, 53, "b"), box(10, 100, "c"), box(20, 50, "a"), box(100, 10, "title", h=30)]
    rows = [[b["text"] for b in row] for row in reading_order(lines)]
    assert rows == [["title"], ["a", "b"], ["c"]]


def test_min_confidence_applies_without_new_ocr(images, tmp_path, count_reads):
    path = str(images["refund"])
    assert "Refund" in ocr_images([path], _cfg(tmp_path), workers=1, progress=False)[path]
    assert len(count_reads) == 1
    strict = ocr_images([path], _cfg(tmp_path, min_confidence=1.01), workers=1, progress=False)
    assert strict[path] == ""  # every line filtered at read time ...
    assert len(count_reads) == 1  # ... from the cached raw lines, without reading the image again
    record = json.loads(cache_path(tmp_path / "cache", file_hash(path)).read_text())
    assert record["settings"]["det_limit_type"] == "max" and all(
        0 < ln["conf"] <= 1 for ln in record["lines"]
    )


def test_cache_resumes_after_a_crash_and_reads_only_missing(images, tmp_path, count_reads):
    cfg = _cfg(tmp_path)
    paths = [str(images[k]) for k in ("refund", "order", "blank")]
    first, stats = ocr_records(paths, cfg, workers=1, progress=False)
    assert (stats.read, stats.cached) == (3, 0) and len(count_reads) == 3
    assert first[str(images["blank"])]["lines"] == []
    # A kill after two images were cached leaves exactly this state behind.
    cache_path(cfg.cache_dir, file_hash(paths[1])).unlink()
    count_reads.clear()
    again, stats = ocr_records(paths, cfg, workers=1, progress=False)
    assert count_reads == [paths[1]]
    assert (stats.read, stats.cached, stats.unique) == (1, 2, 3)
    assert {p: r["text"] for p, r in again.items()} == {p: r["text"] for p, r in first.items()}


def test_cache_is_keyed_by_content_not_path(images, tmp_path, count_reads):
    cfg = _cfg(tmp_path)
    original = str(images["row"])
    ocr_images([original], cfg, workers=1, progress=False)
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    count_reads.clear()
    texts, stats = ocr_records([str(copy), original], cfg, workers=1, progress=False)
    assert count_reads == [] and stats.cached == 1 and stats.read == 0
    assert texts[str(copy)]["text"] == texts[original]["text"]


def test_other_settings_or_damaged_file_is_read_again(images, tmp_path, count_reads):
    cfg = _cfg(tmp_path)
    path = str(images["order"])
    ocr_images([path], cfg, workers=1, progress=False)
    file = cache_path(cfg.cache_dir, file_hash(path))
    record = json.loads(file.read_text())
    file.write_text(json.dumps(record | {"settings": record["settings"] | {"det_limit_side_len": 736}}))
    ocr_images([path], cfg, workers=1, progress=False)
    file.write_text('{"text": "trunc')
    assert "Checkout" in ocr_images([path], cfg, workers=1, progress=False)[path]
    assert len(count_reads) == 3


def test_process_pool_reads_the_same_text(images, tmp_path, monkeypatch, count_reads):
    monkeypatch.setattr(reader_mod, "POOL_MIN", 2)  # use the pool for 2 images instead of 16
    paths = [str(images["refund"]), str(images["order"])]
    pooled, stats = ocr_records(paths, _cfg(tmp_path, "a"), workers=2, progress=False)
    assert stats.read == 2 and count_reads == []  # read in the worker processes, not here
    local, _ = ocr_records(paths, _cfg(tmp_path, "b"), workers=1, progress=False)
    assert len(count_reads) == 2
    assert {p: r["lines"] for p, r in pooled.items()} == {p: r["lines"] for p, r in local.items()}


def test_cjk_text(tmp_path):
    if not Path(CJK_FONT).exists():
        pytest.skip(f"no CJK font at {CJK_FONT}: apt-get install fonts-wqy-microhei")
    path = str(
        render(tmp_path / "cjk.png", [(20, 40, "退款页面"), (20, 120, "订单 Order 59.90")], font=CJK_FONT)
    )
    text = ocr_images([path], _cfg(tmp_path), workers=1, progress=False)[path]
    assert text.splitlines()[0] == "退款页面"
    assert "Order" in text and "59.90" in text


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(OcrError, match="nope.png"):
        ocr_images([str(tmp_path / "nope.png")], _cfg(tmp_path), workers=1, progress=False)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(OcrError, match="bad.png"):
        ocr_images([str(bad)], _cfg(tmp_path), workers=1, progress=False)


def test_cut_text_prefers_line_ends():
    text = "first line\nsecond line here\nthird"
    assert cut_text(text, 20) == "first line"  # line end at 10 keeps half the budget
    assert cut_text(text, 100) == text
    assert cut_text(text, 0) == text
    assert cut_text("one long line of words", 12) == "one long"  # no line end: last space
    assert cut_text("x" * 50, 10) == "x" * 10


def test_ocr_text_for_joins_multi_image_cells_and_cuts(images, tmp_path):
    refund, row = str(images["refund"]), str(images["row"])
    cfg = _cfg(tmp_path, max_chars=1000)
    texts = ocr_text_for([f"{row}|{refund}", refund], cfg, workers=1, progress=False)
    assert texts[f"{row}|{refund}"] == texts_of(row, cfg) + "\n" + texts[refund]
    short = ocr_text_for([refund], _cfg(tmp_path, max_chars=20), workers=1, progress=False)[refund]
    assert short == texts[refund].splitlines()[0]  # "Refund request" (14 chars): cut at the line end


def texts_of(path: str, cfg: OcrConfig) -> str:
    return ocr_images([path], cfg, workers=1, progress=False)[path]


def test_run_on_competition_counts_and_dedupes(images, tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for name in ("refund", "order"):
        shutil.copyfile(images[name], data / "img" / f"{name}.png")
    shutil.copyfile(images["refund"], data / "img" / "refund_again.png")  # same bytes as a train image
    (data / "labels.json").write_text(json.dumps({"refund": "A refund page.", "other": "Anything else."}))
    (data / "train.csv").write_text("image,label\nimg/refund.png,refund\nimg/order.png,other\n")
    (data / "test.csv").write_text("id,image\nt1,img/refund_again.png\n")
    cfg = _cfg(tmp_path)
    stats = run_ocr_on_competition(DataConfig(dir=str(data)), cfg, workers=1)
    assert (stats["images"], stats["unique"], stats["read"], stats["cached"]) == (3, 2, 2, 0)
    again = run_ocr_on_competition(DataConfig(dir=str(data)), cfg, workers=1)
    assert (again["read"], again["cached"], again["no_text"]) == (0, 2, 0)


@pytest.mark.parametrize("broken", ["metadata", "import"])
def test_a_broken_rapidocr_install_says_how_to_fix_it(tmp_path, monkeypatch, broken):
    """Without the package's metadata this was a traceback; without an importable module, "an OCR
    worker process died ... (out of memory or killed?)"."""
    import builtins
    from importlib.metadata import PackageNotFoundError

    reader_mod._rapidocr_version.cache_clear()
    if broken == "metadata":

        def no_version(name):
            raise PackageNotFoundError(name)

        monkeypatch.setattr(reader_mod, "version", no_version)
    else:
        real_import = builtins.__import__

        def no_module(name, *args, **kwargs):
            if name.startswith("rapidocr_onnxruntime"):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_module)
    Image.new("RGB", (40, 20), "white").save(tmp_path / "a.png")
    try:
        with pytest.raises(OcrError, match="pip install rapidocr-onnxruntime.*ocr.enabled=false"):
            ocr_images([str(tmp_path / "a.png")], _cfg(tmp_path), workers=1, progress=False)
    finally:
        reader_mod._rapidocr_version.cache_clear()
