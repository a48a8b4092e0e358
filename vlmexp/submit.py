"""The submission CSV, validated before it is written.

A competition rejects (or silently mis-scores) a file with a missing id, a repeated id or a
label it does not know, so every problem is listed at once, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vlmexp.tables import read_table, write_table


class SubmissionError(ValueError):
    """The submission would be refused; the message lists every problem found."""


def _some(values, n: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f", ... ({len(values)} in all)" if len(values) > n else "")


def validate_submission(
    df: pd.DataFrame, test_ids: list[str], labels: list[str], id_col: str = "id", label_col: str = "label"
) -> None:
    """Raise SubmissionError listing missing, duplicate and unknown ids, unknown and empty labels."""
    absent = [c for c in (id_col, label_col) if c not in df.columns]
    if absent:
        raise SubmissionError(f"submission lacks columns {absent}; it has {list(df.columns)}")
    ids = df[id_col].astype(str)
    want = [str(i) for i in test_ids]
    wanted, have = set(want), set(ids)
    problems = []
    missing = [i for i in want if i not in have]
    if missing:
        problems.append(f"{len(missing)} test ids missing: {_some(missing)}")
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        problems.append(f"{len(dup)} ids repeated: {_some(dup)}")
    unknown = ids[~ids.isin(wanted)].unique()
    if len(unknown):
        problems.append(f"{len(unknown)} ids not in the test set: {_some(unknown)}")
    lab = df[label_col]
    empty = lab.isna() | (lab.astype(str).str.strip() == "")
    if empty.any():
        problems.append(f"{int(empty.sum())} rows have no label, e.g. ids {_some(ids[empty])}")
    bad = lab[~empty & ~lab.astype(str).isin(labels)].astype(str).unique()
    if len(bad):
        problems.append(f"{len(bad)} unknown labels: {_some(bad)}; known: {_some(labels, 10)}")
    if problems:
        raise SubmissionError("submission refused:\n- " + "\n- ".join(problems))


def make_submission(
    run_dir: Path,
    test_ids: list[str],
    labels: list[str],
    sample: Path | None = None,
    out: Path | None = None,
    force: bool = False,
    id_col: str = "id",
) -> Path:
    """Write the run's test predictions (`test_probs.csv`: id, pred, ...) as a submission CSV.

    With `sample` (a 2-column CSV such as sample_submission.csv), its column names and row order
    are kept; without it, columns are `<id_col>,label` in `test_ids` order. Default out:
    `run_dir/submission.csv`. An existing file is only replaced with force=True.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "submission.csv"
    if out.is_dir():  # --force would not replace a folder: say so before anything else
        raise SubmissionError(f"{out} is a folder; give a file path, e.g. --out {out / 'submission.csv'}")
    if out.exists() and not force:
        raise SubmissionError(f"{out} exists; pass --force to overwrite it, or --out another file")
    probs_path = run_dir / "test_probs.csv"
    if not probs_path.exists():
        raise SubmissionError(f"{probs_path} not found: the run has not predicted the test set yet")
    preds = read_table(probs_path)
    if preds["id"].duplicated().any():
        raise SubmissionError(f"{probs_path} repeats ids: {_some(preds['id'][preds['id'].duplicated()])}")
    pred_of = preds.set_index("id")["pred"]
    wanted = {str(i) for i in test_ids}
    if sample is not None:
        try:
            frame = pd.read_csv(sample, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise SubmissionError(
                f"sample {sample} is empty; give the competition's sample_submission.csv (a header "
                "and one row per test id), or leave --sample out for <id>,label in test.csv order"
            ) from None
        if frame.shape[1] != 2:
            raise SubmissionError(f"sample {sample} has {frame.shape[1]} columns; expected 2 (id, label)")
        columns = list(frame.columns)
        # The id column is the one holding the test ids, wherever it stands: a sample of "label,id"
        # read as id-first once refused every row of a correct submission.
        hits = {c: int(frame[c].astype(str).isin(wanted).sum()) for c in columns}
        sid = max(columns, key=lambda c: (hits[c], -columns.index(c)))
        slabel = next(c for c in columns if c != sid)
        order = frame[sid].astype(str)
    else:
        sid, slabel = id_col, "label"
        columns = [sid, slabel]
        order = pd.Series([str(i) for i in test_ids], dtype=object)
    unpredicted = [i for i in order if i in wanted and i not in pred_of.index]
    if unpredicted:  # e.g. a run made with data.limit=60 predicted 60 of 200 test rows
        raise SubmissionError(
            f"submission refused:\n- {len(unpredicted)} of {len(wanted)} test ids have no prediction in "
            f"{probs_path}: {_some(unpredicted)}"
        )
    df = pd.DataFrame({sid: order.to_numpy(), slabel: order.map(pred_of).to_numpy()})[columns]
    validate_submission(df, test_ids, labels, sid, slabel)
    return write_table(df, out)
