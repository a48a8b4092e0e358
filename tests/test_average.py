"""`exp export RUN --average-folds`: one adapter whose update is the mean of the folds' updates, read
back through peft itself (tiny Qwen2-VL)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from vlmexp.cli import app
from vlmexp.config import load_config
from vlmexp.models.average import AverageError, average_adapters
from vlmexp.models.load import load_model
from vlmexp.rundir import RunDir
from vlmexp.tables import write_table


def _adapter(tiny_models, out, seed: int, r: int = 4):
    """A fold adapter with random (non-zero) B and lm_head, as training would leave it."""
    cfg = load_config(
        [f"model.name={tiny_models('qwen2_vl')}", "lora.modules_to_save=[lm_head]", f"lora.r={r}"]
    )
    torch.manual_seed(seed)
    model = load_model(cfg, training=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


def _updates(tiny_models, adapter) -> dict[str, torch.Tensor]:
    """Every adapted module's weight update as peft computes it, plus the fully trained lm_head."""
    base = AutoModelForImageTextToText.from_pretrained(tiny_models("qwen2_vl"))
    model = PeftModel.from_pretrained(base, adapter)
    out = {
        n: m.get_delta_weight("default")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and m.lora_A
    }
    out["lm_head"] = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    return out


def test_average_of_identical_folds_equals_the_fold(tiny_models, tmp_path):
    one = _adapter(tiny_models, tmp_path / "f0", seed=0)
    avg = average_adapters([one, one, one], tmp_path / "avg")
    assert json.loads((avg / "adapter_config.json").read_text())["r"] == 12
    want, got = _updates(tiny_models, one), _updates(tiny_models, avg)
    assert want.keys() == got.keys() and len(want) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


def test_average_of_two_folds_is_the_mean_update(tiny_models, tmp_path):
    a, b = _adapter(tiny_models, tmp_path / "f0", seed=0), _adapter(tiny_models, tmp_path / "f1", seed=1)
    avg = average_adapters([a, b], tmp_path / "avg")
    ua, ub, got = _updates(tiny_models, a), _updates(tiny_models, b), _updates(tiny_models, avg)
    for name in ua:
        torch.testing.assert_close(got[name], (ua[name] + ub[name]) / 2, rtol=0, atol=1e-6)
        assert not torch.allclose(got[name], ua[name]) and not torch.allclose(got[name], ub[name])


def test_adapters_of_different_runs_are_refused(tiny_models, tmp_path):
    a, b = _adapter(tiny_models, tmp_path / "f0", seed=0), _adapter(tiny_models, tmp_path / "f1", seed=1, r=8)
    with pytest.raises(AverageError, match=r"differs from .*f0 in r"):
        average_adapters([a, b], tmp_path / "avg")
    with pytest.raises(AverageError, match="no LoRA adapter"):
        average_adapters([a, tmp_path], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def _competition(root):
    """4 train and 3 test images of two classes, with test answers."""
    (root / "img").mkdir(parents=True)
    (root / "labels.json").write_text(json.dumps({"red": "a red image", "blue": "a blue image"}))
    names = {"r0": "red", "r1": "red", "r2": "blue", "r3": "blue", "t0": "red", "t1": "blue", "t2": "red"}
    for i, label in names.items():
        Image.new("RGB", (64, 64), (200, 0, 0) if label == "red" else (0, 0, 200)).save(
            root / "img" / f"{i}.png"
        )
    rows = [{"id": i, "image": f"img/{i}.png", "label": x} for i, x in names.items()]
    pd.DataFrame(rows[:4]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(rows[4:]).drop(columns="label").to_csv(root / "test.csv", index=False)
    pd.DataFrame(rows[4:]).drop(columns="image").to_csv(root / "answers.csv", index=False)
    return root


def test_cli_export_average_folds_and_its_score(tiny_models, tmp_path):
    comp = _competition(tmp_path / "comp")
    cfg = load_config(
        [f"model.name={tiny_models('qwen2_vl')}", "lora.modules_to_save=[lm_head]", "lora.r=4", "folds=2",
         "name=r", f"runs_dir={tmp_path / 'runs'}", f"data.dir={comp}", "data.answers_csv=answers.csv"]
    )  # fmt: skip
    run = RunDir.for_config(cfg)
    run.start(cfg, {})
    for k in range(2):
        shutil.copytree(_adapter(tiny_models, tmp_path / f"f{k}", seed=k), run.adapter_dir(k))
    # The fold ensemble's test predictions: t0 right, t1 and t2 wrong.
    ens = pd.DataFrame({"id": ["t0", "t1", "t2"], "pred": ["red", "red", "blue"]})
    ens["p:red"], ens["p:blue"] = [0.9, 0.9, 0.1], [0.1, 0.1, 0.9]
    write_table(ens, run.path("test_probs.csv"))
    result = CliRunner().invoke(app, ["export", str(run.root), "--average-folds", "--score"])
    assert result.exit_code == 0, result.output
    assert json.loads(run.path("export/averaged_adapter/adapter_config.json").read_text())["r"] == 8
    assert (run.path("export/averaged") / "config.json").exists()  # merged, checked against base+adapter
    got = json.loads(run.path("export/averaged_score.json").read_text())
    assert got["test_rows"] == 3 and got["fold_ensemble_test_accuracy"] == pytest.approx(1 / 3)
    averaged = pd.read_csv(run.path("export/averaged_test.csv"), dtype=str)
    truth = ["red", "blue", "red"]
    assert got["averaged_test_accuracy"] == pytest.approx(np.mean(averaged["pred"].to_numpy() == truth))
    assert got["agreement_with_fold_ensemble"] == pytest.approx(np.mean(averaged["pred"] == ens["pred"]))
