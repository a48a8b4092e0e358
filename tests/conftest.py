"""Shared fixtures. Every test runs offline: any accidental hub lookup fails at once."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models("qwen2_vl") -> Path`: each family built once per session (about 0.1 s each)."""
    from vlmexp.models.tiny import build_tiny

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_models):
    """Alias of `tiny_models` under the name docs/design.md uses: `tiny_model_dir("llava") -> Path`."""
    return tiny_models


@pytest.fixture
def noise_samples(tmp_path):
    """`noise_samples(cfg, labels) -> list[dict]`: prediction samples (no answer, baseline template) of
    4 random-noise images 40 px high and 48, 56, 64, 72 px wide, so a batch of them pads."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from vlmexp.engine.samples import build_samples
    from vlmexp.prompts import load_template

    def make(cfg, labels: list[str]) -> list[dict]:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(4):
            path = tmp_path / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48 + 8 * i, 3), dtype=np.uint8)).save(path)
            rows.append({"id": str(i), "image": str(path)})
        return build_samples(
            pd.DataFrame(rows),
            labels=labels,
            descriptions={},
            template=load_template("baseline"),
            cfg=cfg,
            with_answer=False,
        )

    return make


@pytest.fixture
def finished_folds():
    """A factory of recipe.Experiment whose 2 folds are 'finished' with hand-written one-hot tables
    (fold k holds rows k, k+2, ...), for `finalize` without a model:
    `finished_folds(cfg, labels, gold, preds, test_preds, tree={}, prov={})`."""
    from types import SimpleNamespace

    import pandas as pd

    from vlmexp.recipe import Experiment
    from vlmexp.rundir import RunDir
    from vlmexp.tables import prob_columns, write_table

    def table(ids: list[str], preds: list[str], labels: list[str]) -> pd.DataFrame:
        df = pd.DataFrame({"id": ids, "pred": preds})
        for label, col in zip(labels, prob_columns(labels), strict=True):
            df[col] = [1.0 if p == label else 0.0 for p in preds]
        return df

    def make(cfg, labels, gold, preds, test_preds, tree=None, prov=None) -> Experiment:
        run = RunDir.for_config(cfg)
        started = {**run.start(cfg, {}), **(prov or {})}
        ids = [f"t{i}" for i in range(len(gold))]
        test = pd.DataFrame({"id": [f"x{i}" for i in range(len(test_preds))]})
        for k in range(2):
            rows = list(range(k, len(gold), 2))
            oof = table([ids[i] for i in rows], [preds[i] for i in rows], labels)
            oof.insert(1, "label", [gold[i] for i in rows])
            oof.insert(2, "fold", k)
            write_table(oof, run.fold_dir(k) / "oof.csv")
            write_table(table(list(test["id"]), list(test_preds), labels), run.fold_dir(k) / "test.csv")
            run.mark_fold_done(k, {"fold": k})
        comp = SimpleNamespace(labels=labels, descriptions={}, test=test, train=None, tree=tree or {})
        train = pd.DataFrame({"id": ids, "label": gold})
        return Experiment(
            cfg=cfg,
            run=run,
            prov=started,
            comp=comp,
            train=train,
            train_all=train,
            pseudo=pd.DataFrame(),
            folds=pd.Series(dtype=int),
            template=None,
            ocr=None,
            processor=None,
            test_samples=[],
        )

    return make
