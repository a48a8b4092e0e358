"""Submission CSV: validated, sample order and names kept, never silently overwritten."""

from __future__ import annotations

import pandas as pd
import pytest

from vlmexp.submit import SubmissionError, make_submission, validate_submission
from vlmexp.tables import read_table

LABELS = ["cat", "dog"]
TEST_IDS = ["007", "002", "003"]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    pd.DataFrame(
        {
            "id": ["002", "003", "007"],
            "pred": ["dog", "cat", "cat"],
            "p:cat": [0.1, 0.8, 0.9],
            "p:dog": [0.9, 0.2, 0.1],
        }
    ).to_csv(d / "test_probs.csv", index=False)
    return d


def test_default_submission(run_dir):
    out = make_submission(run_dir, TEST_IDS, LABELS)
    assert out == run_dir / "submission.csv"
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns) == ["id", "label"]
    assert df.values.tolist() == [["007", "cat"], ["002", "dog"], ["003", "cat"]]


def test_sample_order_and_names(run_dir, tmp_path):
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"ImageId": ["003", "007", "002"], "Category": ["x", "x", "x"]}).to_csv(sample, index=False)
    out = make_submission(run_dir, TEST_IDS, LABELS, sample=sample, out=tmp_path / "sub.csv")
    df = pd.read_csv(out, dtype=str)
    assert list(df.columns) == ["ImageId", "Category"]
    assert df.values.tolist() == [["003", "cat"], ["007", "cat"], ["002", "dog"]]


def test_no_overwrite_without_force(run_dir):
    out = make_submission(run_dir, TEST_IDS, LABELS)
    out.write_text("keep me")
    with pytest.raises(SubmissionError, match="--force"):
        make_submission(run_dir, TEST_IDS, LABELS)
    assert out.read_text() == "keep me"
    make_submission(run_dir, TEST_IDS, LABELS, force=True)
    assert "keep me" not in out.read_text()


def test_validation_lists_every_problem():
    df = pd.DataFrame({"id": ["007", "007", "999", "003"], "label": ["cat", "dog", "cat", "bird"]})
    with pytest.raises(SubmissionError) as e:
        validate_submission(df, TEST_IDS, LABELS)
    msg = str(e.value)
    assert "1 test ids missing: '002'" in msg
    assert "1 ids repeated: '007'" in msg
    assert "1 ids not in the test set: '999'" in msg
    assert "1 unknown labels: 'bird'" in msg
    empty = pd.DataFrame({"id": TEST_IDS, "label": ["cat", "", None]})
    with pytest.raises(SubmissionError, match="2 rows have no label"):
        validate_submission(empty, TEST_IDS, LABELS)
    validate_submission(pd.DataFrame({"id": TEST_IDS, "label": ["cat", "dog", "dog"]}), TEST_IDS, LABELS)


def test_missing_prediction_refused(run_dir, tmp_path):
    with pytest.raises(SubmissionError, match="1 of 4 test ids have no prediction.*004"):
        make_submission(run_dir, [*TEST_IDS, "004"], LABELS, out=tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_an_out_path_that_is_a_folder_is_refused_with_a_file_path(run_dir, tmp_path):
    (tmp_path / "outdir").mkdir()
    for force in (False, True):  # --force once crashed with IsADirectoryError
        with pytest.raises(
            SubmissionError, match=r"is a folder; give a file path, e.g. --out .*outdir/submission.csv"
        ):
            make_submission(run_dir, TEST_IDS, LABELS, out=tmp_path / "outdir", force=force)


def test_a_sample_with_the_label_column_first_keeps_its_column_order(run_dir, tmp_path):
    """A sample of "Category,ImageId" was read id-first: every row refused."""
    sample = tmp_path / "sample.csv"
    pd.DataFrame({"Category": ["x", "x", "x"], "ImageId": ["003", "007", "002"]}).to_csv(sample, index=False)
    out = make_submission(run_dir, TEST_IDS, LABELS, sample=sample, out=tmp_path / "sub.csv")
    got = pd.read_csv(out, dtype=str)
    assert list(got.columns) == ["Category", "ImageId"] and got["ImageId"].tolist() == ["003", "007", "002"]
    want = read_table(run_dir / "test_probs.csv").set_index("id")["pred"]
    assert got["Category"].tolist() == [want[i] for i in ["003", "007", "002"]]
