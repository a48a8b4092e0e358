"""`exp` commands through typer's CliRunner: one option style, clear errors, no tracebacks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from vlmexp.cli import app
from vlmexp.leaderboard import append

runner = CliRunner()
LABELS = ["a", "b"]


def _run_folder(root: Path, ids: list[str], data_dir: str = "comp") -> Path:
    """A finished run as report/submit read it: config.yaml, cv.json, oof.csv, test_probs.csv."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"prompt: baseline\ndata:\n  dir: {data_dir}\n")
    (root / "cv.json").write_text(json.dumps({"metric": "macro_f1", "mean": 0.5, "std": 0.1, "folds": [0.5]}))
    labels = ["a", "b"] * (len(ids) // 2)
    oof = pd.DataFrame({"id": ids, "label": labels, "fold": 0, "pred": labels, "p:a": 0.5, "p:b": 0.5})
    oof.to_csv(root / "oof.csv", index=False)
    pd.DataFrame({"id": ["x0", "x1"], "pred": ["a", "b"], "p:a": 0.5, "p:b": 0.5}).to_csv(
        root / "test_probs.csv", index=False
    )
    return root


def _competition(root: Path) -> Path:
    """train/test/labels and 2 tiny images: enough for load_competition."""
    from PIL import Image

    root.mkdir(parents=True)
    for name in ("i0.png", "i1.png"):
        Image.new("RGB", (8, 8), "white").save(root / name)
    (root / "train.csv").write_text("image,label\ni0.png,a\ni1.png,b\n")
    (root / "test.csv").write_text("id,image\nx0,i0.png\nx1,i1.png\n")
    (root / "labels.json").write_text(json.dumps({"a": "first", "b": "second"}))
    return root


def test_report_on_runs_of_different_data_prints_the_message_only(tmp_path):
    a = _run_folder(tmp_path / "runs" / "a", ["s0", "s1"])
    b = _run_folder(tmp_path / "runs" / "b", ["t0", "t1"])
    result = runner.invoke(app, ["report", str(a), str(b), f"runs_dir={tmp_path / 'runs'}"])
    assert result.exit_code == 2, result.output
    assert "share no OOF ids" in result.output and "Traceback" not in result.output


def test_report_finds_runs_by_name_with_runs_dir_key(tmp_path):
    for name, ids in (("a", ["s0", "s1"]), ("b", ["s0", "s1"])):
        _run_folder(tmp_path / "elsewhere" / name, ids)
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", "a", "b", f"runs_dir={tmp_path / 'elsewhere'}", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").exists()


def test_report_folder_names_its_baseline_and_a_run_is_not_compared_with_itself(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b", "c"):
        _run_folder(runs / name, ["s0", "s1"])
    for base in ("b", "c"):  # two baselines for the same pair of runs: two reports, not one overwritten
        result = runner.invoke(app, ["report", "a", "b", "--baseline", base, f"runs_dir={runs}"])
        assert result.exit_code == 0, result.output
    assert (runs / "_reports" / "b-vs-a" / "report.md").exists()
    assert (runs / "_reports" / "c-vs-a-vs-b" / "report.md").exists()
    result = runner.invoke(app, ["report", "a", "a", f"runs_dir={runs}"])
    assert result.exit_code == 2 and "two or more different runs" in result.output


def test_report_of_an_unknown_run_says_where_it_looked(tmp_path):
    result = runner.invoke(app, ["report", "nope", f"runs_dir={tmp_path}"])
    assert result.exit_code == 2 and "no run 'nope'" in result.output


def test_submit_by_folder_path_with_empty_sample_is_a_clear_error(tmp_path, monkeypatch):
    comp = _competition(tmp_path / "comp")
    run = _run_folder(tmp_path / "somewhere" / "r1", ["s0", "s1"], data_dir=str(comp))
    empty = tmp_path / "sample.csv"
    empty.write_text("")
    monkeypatch.chdir(tmp_path / "comp")  # not where the run lives: named by its folder from anywhere
    result = runner.invoke(
        app, ["submit", str(run), "--sample", str(empty), "--out", str(tmp_path / "s.csv")]
    )
    assert result.exit_code == 2, result.output
    assert "sample.csv is empty" in result.output and "Traceback" not in result.output

    result = runner.invoke(app, ["submit", "r1", f"runs_dir={tmp_path / 'somewhere'}", "--out", "s.csv"])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "comp" / "s.csv")["label"].tolist() == ["a", "b"]


def test_submit_old_runs_dir_flag_still_works(tmp_path):
    comp = _competition(tmp_path / "comp")
    _run_folder(tmp_path / "runs2" / "r1", ["s0", "s1"], data_dir=str(comp))
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["submit", "r1", "--runs-dir", str(tmp_path / "runs2"), "--out", str(out)])
    assert result.exit_code == 0, result.output and out.exists()


def _board(tmp_path: Path) -> Path:
    path = tmp_path / "lb.csv"
    for run, data, cv in (("mine", str(tmp_path / "comp_a"), 0.7), ("theirs", str(tmp_path / "comp_b"), 0.9)):
        append({"run": run, "metric": "macro_f1", "cv_mean": cv, "data": data}, path)
    return path


def test_leaderboard_shows_the_configured_competition_by_default(tmp_path):
    path = _board(tmp_path)
    result = runner.invoke(app, ["leaderboard", f"leaderboard={path}", f"data.dir={tmp_path / 'comp_a'}"])
    assert result.exit_code == 0, result.output
    assert "mine" in result.output and "theirs" not in result.output
    result = runner.invoke(app, ["leaderboard", f"leaderboard={path}", "--data", str(tmp_path / "comp_b")])
    assert "theirs" in result.output and "| mine" not in result.output
    result = runner.invoke(app, ["leaderboard", "--path", str(path), "--all"])  # the old flag
    assert "mine" in result.output and "theirs" in result.output
    md = path.with_suffix(".md")
    before = md.read_text()
    result = runner.invoke(app, ["leaderboard", f"leaderboard={path}", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 0 and "left as it was" in " ".join(result.output.split())
    assert md.read_text() == before  # once overwritten with "_no runs on .../nope yet_"
    for top in ("0", "-1"):  # -1 once printed all rows but the last, 0 all of them
        result = runner.invoke(app, ["leaderboard", f"leaderboard={path}", "--all", "--top", top])
        assert result.exit_code == 2 and "--top" in result.output, result.output


def test_prompts_show_row_out_of_range_is_a_clear_error(tmp_path):
    comp = _competition(tmp_path / "comp")
    result = runner.invoke(app, ["prompts", "show", f"data.dir={comp}", "--row", "999"])
    assert result.exit_code == 2, result.output
    assert "--row 999" in result.output and "0..1" in result.output and "Traceback" not in result.output


def test_prompts_show_with_ocr_shows_the_text_the_run_trains_on(tmp_path, monkeypatch):
    import vlmexp.ocr

    comp = _competition(tmp_path / "comp")
    monkeypatch.setattr(
        vlmexp.ocr, "ocr_text_for", lambda cells, cfg, **kw: {c: "SALE 50% OFF" for c in cells}
    )
    result = runner.invoke(app, ["prompts", "show", f"data.dir={comp}", "ocr.enabled=true", "--row", "1"])
    assert result.exit_code == 0, result.output
    assert "SALE 50% OFF" in result.output


def test_known_library_deprecations_are_filtered_others_still_show(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["config", f"runs_dir={tmp_path}"])
        assert result.exit_code == 0, result.output
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


@pytest.mark.parametrize("command", ["report", "submit", "serve", "export", "ensemble"])
def test_commands_that_take_a_run_accept_runs_dir_as_a_key(tmp_path, command):
    result = runner.invoke(app, [command, "missing-run", f"runs_dir={tmp_path / 'xx'}"])
    assert result.exit_code == 2, result.output
    assert "missing-run" in result.output and "Traceback" not in result.output


def test_config_refuses_a_run_name_that_is_not_one_folder(tmp_path):
    result = runner.invoke(app, ["config", "name=..", f"runs_dir={tmp_path}"])
    assert result.exit_code == 2 and "not one plain folder name" in result.output


def test_bitsandbytes_missing_kernels_notice_is_not_logged_but_its_errors_are():
    """Quiet from the start of every command, not only once a command sets up logging: `exp config
    train.args.x=1` imports trl (and bitsandbytes) to check the name and never sets it up."""
    import logging

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bnb.setLevel(logging.NOTSET)
    result = runner.invoke(app, ["config", "train.args.bogus=1"])
    assert result.exit_code == 2 and "not an SFTConfig" in result.output
    assert not bnb.isEnabledFor(logging.WARNING) and bnb.isEnabledFor(logging.ERROR)


def test_a_flagged_run_says_so_after_its_cv_line(tmp_path):
    from vlmexp.cli import _print_cv, console

    root = _run_folder(tmp_path / "r", ["s0", "s1"])
    cv = {"metric": "macro_f1", "mean": 0.018, "std": 0.0, "folds": [0.018], "accuracy": 0.1}
    (root / "cv.json").write_text(json.dumps({**cv, "flag": "one_class", "majority_macro_f1": 0.0185}))
    with console.capture() as out:
        _print_cv(root)
    assert "flagged: one_class" in out.get() and "0.0185" in out.get()


def test_submit_from_elsewhere_of_a_run_with_a_relative_data_dir_says_what_to_add(tmp_path, monkeypatch):
    _competition(tmp_path / "proj" / "comp")
    run = _run_folder(tmp_path / "proj" / "runs" / "r1", ["s0", "s1"], data_dir="comp")  # made in proj/
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["submit", str(run), "--out", "s.csv"])
    assert result.exit_code == 2 and "data.dir=comp" in result.output and "add data.dir=PATH" in result.output
    comp = tmp_path / "proj" / "comp"
    result = runner.invoke(app, ["submit", str(run), f"data.dir={comp}", "--out", "s.csv"])
    assert result.exit_code == 0, result.output


def test_a_flagged_run_says_what_helps_where_it_is_printed(tmp_path, capsys):
    """A reused finished run logs no warning, so "see the warning above" pointed at nothing."""
    import json

    from vlmexp.cli_common import _print_cv

    run = tmp_path / "smoke"
    run.mkdir()
    cv = {"metric": "macro_f1", "mean": 0.01, "std": 0.0, "folds": [0.01, 0.01], "accuracy": 0.1}
    cv |= {"flag": "one_class", "majority_macro_f1": 0.02}
    (run / "cv.json").write_text(json.dumps(cv))
    _print_cv(run)
    out = " ".join(capsys.readouterr().err.split())  # the CLI's console writes to stderr
    assert "flagged: one_class" in out and "What usually helps" in out and "warning above" not in out
    assert "no submission" in out  # no submission.csv in the folder
