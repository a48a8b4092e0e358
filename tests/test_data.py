"""Competition loading and checking: every corruption is reported with its file, row and a fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from vlmexp.config import DataConfig
from vlmexp.data import DataError, check_competition, load_competition, open_image
from vlmexp.data_check import format_check
from vlmexp.demo import make_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "demo", seed=3, n_train=60, n_test=20)


@pytest.fixture
def comp(tmp_path, demo) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "comp"))


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def edit(path: Path, row: int, col: str, value: str) -> str:
    """Set 1-based data row `row` of column `col`; returns the old value."""
    df = read(path)
    old = df.loc[row - 1, col]
    df.loc[row - 1, col] = value
    df.to_csv(path, index=False)
    return old


def found(result, file: str, row: int | None, text: str) -> bool:
    return any(p.file == file and p.row == row and text in p.message for p in result.problems)


def render(result) -> str:
    console = Console(record=True, width=200)
    console.print(format_check(result))
    return console.export_text()


def test_clean_demo_has_no_problems(comp):
    result = check_competition(DataConfig(dir=str(comp)))
    assert result.problems == []
    assert result.rows == {"train": 60, "test": 20}
    assert list(result.class_counts) == list(json.loads((comp / "labels.json").read_text()))
    assert sum(result.class_counts.values()) == 60
    assert result.imbalance_ratio == max(result.class_counts.values()) / min(result.class_counts.values())
    assert 300 <= result.image_sizes["width"]["min"] <= result.image_sizes["width"]["max"] <= 500
    assert "OK" in render(result)


def test_missing_image(comp):
    path = edit(comp / "train.csv", 5, "image", "images/train_0005.png")
    (comp / path).unlink()
    result = check_competition(comp)
    assert found(result, "train.csv", 5, "image not found")
    assert len(result.problems) == 1
    assert result.problems[0].fix


def test_missing_image_suggests_the_right_path(comp):
    edit(comp / "train.csv", 2, "image", "train_0002.png")
    result = check_competition(comp)
    assert found(result, "train.csv", 2, "image not found")
    assert "images/train_0002.png" in result.problems[0].fix


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image(comp, damage):
    path = comp / read(comp / "test.csv").loc[2, "image"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not an image at all")
    result = check_competition(comp)
    assert found(result, "test.csv", 3, "cannot decode image")
    # without decoding, loading only checks existence; with check_images it must fail too
    load_competition(DataConfig(dir=str(comp)))
    with pytest.raises(DataError, match="test.csv row 3"):
        load_competition(DataConfig(dir=str(comp)), check_images=True)


def test_unknown_label_suggests_the_nearest(comp):
    edit(comp / "train.csv", 7, "label", "refund_requests")
    edit(comp / "train.csv", 8, "label", "")
    result = check_competition(comp)
    assert found(result, "train.csv", 7, "'refund_requests' is not in labels.json")
    assert "refund_request" in next(p.fix for p in result.problems if p.row == 7)
    assert found(result, "train.csv", 8, "empty label")


def test_duplicate_test_id(comp):
    first = read(comp / "test.csv").loc[1, "id"]
    edit(comp / "test.csv", 4, "id", first)
    result = check_competition(comp)
    assert found(result, "test.csv", 4, f"duplicate id ('id') '{first}' (first in row 2)")


def test_duplicate_train_id_with_id_column(comp):
    df = read(comp / "train.csv")
    df.insert(0, "id", [f"r{i}" for i in range(len(df))])
    df.loc[9, "id"] = "r3"
    df.to_csv(comp / "train.csv", index=False)
    result = check_competition(comp)
    assert found(result, "train.csv", 10, "duplicate id ('id') 'r3' (first in row 4)")


def test_duplicate_train_image_without_id_column(comp):
    edit(comp / "train.csv", 6, "image", read(comp / "train.csv").loc[0, "image"])
    result = check_competition(comp)
    assert found(result, "train.csv", 6, "duplicate image")


def test_empty_files(comp):
    (comp / "train.csv").write_bytes(b"")
    (comp / "test.csv").write_text("id,image\n")
    result = check_competition(comp)
    assert found(result, "train.csv", None, "empty (0 bytes)")
    assert found(result, "test.csv", None, "no rows")


def test_missing_column_names_what_exists(comp):
    df = read(comp / "train.csv").rename(columns={"label": "labels"})
    df.to_csv(comp / "train.csv", index=False)
    result = check_competition(comp)
    [problem] = result.problems
    assert problem.file == "train.csv" and problem.row is None
    assert "missing column 'label'" in problem.message and "image, labels, reason" in problem.message
    assert "data.label_col=labels" in problem.fix


def test_custom_column_name_is_respected(comp):
    df = read(comp / "train.csv").rename(columns={"label": "category"})
    df.to_csv(comp / "train.csv", index=False)
    assert not check_competition(comp).ok
    comp_data = load_competition(DataConfig(dir=str(comp), label_col="category"))
    assert "label" in comp_data.train.columns and "category" not in comp_data.train.columns


def test_paths_outside_the_folder(comp, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (400, 400)).save(outside)
    edit(comp / "train.csv", 3, "image", "../elsewhere.png")
    edit(comp / "test.csv", 2, "image", str(outside))
    result = check_competition(comp)
    assert found(result, "train.csv", 3, "outside the data folder")
    assert found(result, "test.csv", 2, "outside the data folder")


def test_absolute_path_inside_the_folder_is_fine(comp):
    edit(comp / "train.csv", 3, "image", str(comp / "images" / "train_0003.png"))
    assert check_competition(comp).ok
    train = load_competition(DataConfig(dir=str(comp))).train
    assert train.loc[2, "id"] == "images/train_0003.png"


@pytest.mark.parametrize(
    "text, message",
    [
        ('["a", "b"]', "expected a non-empty JSON object, got list"),
        ('{"a": 1}', "'a' has a int description"),
        ('{"a": "x",', "not valid UTF-8 JSON"),
        ('{"a": "x", "a": "y"}', "'a' appears twice"),
        ("{}", "non-empty JSON object"),
    ],
)
def test_malformed_labels_json(comp, text, message):
    (comp / "labels.json").write_text(text)
    result = check_competition(comp)
    assert found(result, "labels.json", None, message)


def test_every_problem_is_reported_at_once(comp):
    (comp / edit(comp / "train.csv", 2, "image", "images/train_0002.png")).unlink()
    edit(comp / "train.csv", 3, "label", "no_such_class")
    path = comp / read(comp / "train.csv").loc[8, "image"]
    path.write_bytes(path.read_bytes()[:300])
    edit(comp / "test.csv", 5, "id", read(comp / "test.csv").loc[0, "id"])
    edit(comp / "test.csv", 6, "image", "../../x.png")
    result = check_competition(comp)
    where = [(p.file, p.row) for p in result.problems]
    assert where == [("train.csv", 2), ("train.csv", 3), ("train.csv", 9), ("test.csv", 5), ("test.csv", 6)]
    text = render(result)
    assert "5 problem(s)" in text and "no_such_class" in text
    with pytest.raises(DataError) as err:
        load_competition(DataConfig(dir=str(comp)), check_images=True)
    assert len(err.value.problems) == 5
    for row in ("train.csv row 2", "train.csv row 3", "train.csv row 9", "test.csv row 5", "test.csv row 6"):
        assert row in str(err.value)


def test_canonical_columns(comp):
    c = load_competition(DataConfig(dir=str(comp)))
    assert list(c.train.columns) == ["id", "image", "label", "reason"]
    assert list(c.test.columns) == ["id", "image"]
    assert c.train.loc[0, "id"] == read(comp / "train.csv").loc[0, "image"]  # relative path as id
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in c.train["image"])
    assert c.train["id"].is_unique and all(isinstance(i, str) for i in c.test["id"])
    assert c.labels == list(c.descriptions) and set(c.train["label"]) <= set(c.labels)


def test_cjk_labels_custom_columns_and_groups(tmp_path):
    root = tmp_path / "cjk"
    (root / "imgs").mkdir(parents=True)
    labels = {"退款页面": "申请退款的页面", "订单详情": "订单的详细信息", "payment": "Paying."}
    (root / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    for i in range(4):
        Image.new("RGB", (320, 400), (i * 40, 0, 0)).save(root / "imgs" / f"{i}.png")
    train = pd.DataFrame(
        {
            "uid": ["007", "008", "009"],
            "path": ["imgs/0.png", "imgs/1.png", "imgs/2.png"],
            "类别": ["订单详情", "退款页面", "订单详情"],
            "user": ["u1", "", "u1"],
            "image": ["thumb0", "thumb1", "thumb2"],  # clashes with the canonical name
        }
    )
    train.to_csv(root / "train.csv", index=False, encoding="utf-8-sig")  # with a BOM, as Excel saves
    pd.DataFrame({"uid": ["001"], "path": ["imgs/3.png"]}).to_csv(root / "test.csv", index=False)
    cfg = DataConfig(dir=str(root), id_col="uid", image_col="path", label_col="类别", group_col="user")
    c = load_competition(cfg)
    assert c.labels == ["退款页面", "订单详情", "payment"]
    assert c.descriptions["退款页面"] == "申请退款的页面"
    assert list(c.train.columns) == ["id", "image", "label", "group", "orig_image"]
    assert list(c.train["id"]) == ["007", "008", "009"]  # stays a string, leading zeros kept
    assert list(c.train["label"]) == ["订单详情", "退款页面", "订单详情"]
    assert list(c.train["group"]) == ["u1", "008", "u1"]  # an ungrouped row is its own group
    assert list(c.test["id"]) == ["001"]
    result = check_competition(cfg)
    assert result.ok and result.class_counts == {"退款页面": 1, "订单详情": 2, "payment": 0}
    assert any(
        "fewer than 5 training rows: 退款页面 (1), 订单详情 (2), payment (0)" in w.message
        for w in result.warnings
    )
    assert "退款页面" in render(result)


def test_limit(comp):
    (comp / edit(comp / "train.csv", 10, "image", "images/train_0010.png")).unlink()
    cfg = DataConfig(dir=str(comp), limit=5)
    c = load_competition(cfg)  # the broken row 10 lies beyond the limit
    assert len(c.train) == 5 and len(c.test) == 5
    assert list(c.test["id"]) == list(read(comp / "test.csv")["id"][:5])
    assert check_competition(cfg).ok
    with pytest.raises(DataError, match="train.csv row 10"):
        load_competition(DataConfig(dir=str(comp)))


def test_image_size_warnings(comp):
    path = comp / read(comp / "test.csv").loc[3, "image"]
    Image.new("RGB", (120, 90)).save(path)
    result = check_competition(comp)
    assert result.ok
    [warning] = [w for w in result.warnings if "longest side" in w.message]
    assert warning.file == "test.csv" and warning.row == 4 and "under 300" in warning.message


def test_missing_folder_and_files(tmp_path):
    result = check_competition(tmp_path / "nope")
    assert not result.ok and "not found" in result.problems[0].message
    (tmp_path / "empty").mkdir()
    result = check_competition(tmp_path / "empty")
    assert {p.file for p in result.problems} == {"labels.json", "train.csv", "test.csv"}


def test_open_image(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    img = open_image(tmp_path / "clear.png")
    assert img.mode == "RGB" and img.size == (40, 30) and img.getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGB", (400, 400), (9, 9, 9)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png.*Fix:"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match=r"gone\.png"):
        open_image(tmp_path / "gone.png")


def test_missing_labels_json_fix_is_written_from_train_labels(comp):
    """Without labels.json the fix is the file to write, with train.csv's labels in first-seen order
    (CJK and "NA" kept as written), so the user only fills in the descriptions."""
    df = read(comp / "train.csv")
    first = df["label"].iloc[0]
    df["label"] = df["label"].replace({first: "类别1"})
    df.loc[1, "label"] = "NA"
    df.to_csv(comp / "train.csv", index=False)
    (comp / "labels.json").unlink()
    result = check_competition(DataConfig(dir=str(comp)))
    [problem] = [p for p in result.problems if p.file == "labels.json"]
    want = list(dict.fromkeys(df["label"]))
    shown = problem.fix[problem.fix.index("{") : problem.fix.index("}") + 1]
    assert list(json.loads(shown)) == want and want[:2] == ["类别1", "NA"]
    assert str(comp / "labels.json") in problem.fix and "data.labels_json" in problem.fix


def test_an_image_over_pils_pixel_limit_is_told_to_be_resized(comp, monkeypatch):
    """PIL refuses images over twice MAX_IMAGE_PIXELS (e.g. 14000 x 14000); opening and saving it
    again, the usual fix for a broken file, cannot help there."""
    from PIL import Image as PILImage

    path = comp / read(comp / "test.csv").loc[2, "image"]
    with PILImage.open(path) as im:
        pixels = im.size[0] * im.size[1]
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", pixels // 3)  # this image is now a "bomb"
    result = check_competition(comp)
    [problem] = [p for p in result.problems if p.file == "test.csv" and p.row == 3 and "Bomb" in p.message]
    assert "resize it" in problem.fix
