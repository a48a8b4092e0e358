"""speed.freeze_heap (engine/heap.py): full GCs skip the run's long-lived objects, and nothing a fold
made is kept alive by the freeze."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from vlmexp.config import load_config
from vlmexp.demo import make_demo
from vlmexp.engine import heap


class Cycle:
    def __init__(self):
        self.me = self  # only the cyclic collector frees it


def test_fold_start_freezes_what_lives_and_leaves_later_objects_collectable():
    heap.thaw()
    try:
        before = Cycle()
        heap.fold_start(True)
        assert gc.get_freeze_count() > 0
        later = weakref.ref(Cycle())  # made after the freeze, garbage at once
        gc.collect()
        assert later() is None
        kept = weakref.ref(before)
        del before
        gc.collect()
        assert kept() is not None  # frozen: a full collection skips it
        heap.thaw()
        gc.collect()
        assert kept() is None and gc.get_freeze_count() == 0
    finally:
        heap.thaw()


def test_fold_start_does_nothing_when_off():
    heap.thaw()  # whatever an earlier test's worker-style fold (run_fold_task) left frozen
    heap.fold_start(False)
    assert gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, n_train=24, n_test=12)


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_fold_models_are_freed_and_nothing_stays_frozen(demo, tmp_path, monkeypatch, reuse):
    """Fold 0's model (its own, or the LoRA wrapper on the shared base) must be gone when fold 1
    starts: a freeze that caught it would keep a 72B model's GPU memory alive for the whole run."""
    from vlmexp.models.base_once import BaseModel
    from vlmexp.recipe import run_experiment

    handed, alive_at_start, frozen_during = [], [], []
    real = BaseModel.for_training

    def spying(self, seed):
        alive_at_start.append([ref() is not None for ref in handed])
        model = real(self, seed)
        frozen_during.append(gc.get_freeze_count())
        handed.append(weakref.ref(model))
        return model

    monkeypatch.setattr(BaseModel, "for_training", spying)
    cfg = load_config(
        [f"data.dir={demo}", f"runs_dir={tmp_path / 'runs'}", f"leaderboard={tmp_path / 'lb.csv'}",
         f"model.cache_dir={tmp_path.parent / 'tiny'}", "folds=2", "train.epochs=1", "train.eval=false",
         "train.batch_size=8", "predict.batch_size=8", "train.report_to=none", f"speed.reuse_base={reuse}"]
    )  # fmt: skip
    run_experiment(cfg)
    assert alive_at_start == [[], [False]]
    assert all(n > 0 for n in frozen_during)  # the run's objects were frozen while folds ran
    assert gc.get_freeze_count() == 0  # and thawed when the folds ended


@pytest.mark.slow
def test_a_failed_fold_leaves_nothing_frozen(demo, tmp_path, monkeypatch):
    import vlmexp.recipe as recipe

    def boom(*a, **k):
        raise RuntimeError("fold died")

    monkeypatch.setattr(recipe, "train_fold", boom)
    cfg = load_config(
        [f"data.dir={demo}", f"runs_dir={tmp_path / 'runs'}", f"leaderboard={tmp_path / 'lb.csv'}",
         f"model.cache_dir={tmp_path.parent / 'tiny'}", "folds=2", "train.report_to=none"]
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="fold died"):
        recipe.run_experiment(cfg)
    assert gc.get_freeze_count() == 0
