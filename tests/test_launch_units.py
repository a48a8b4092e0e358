"""The fold as the unit of work: launchers never import the recipe; a task that cannot see its run
folder fails at once, saying what to fix, without training into a folder of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmexp.config import load_config


def test_launchers_do_not_import_the_recipe():
    code = (
        "import sys, vlmexp.launch, vlmexp.launch.torchrun, vlmexp.launch.ray_tasks; "
        "print('vlmexp.recipe' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unit_travels_by_name():
    from vlmexp.launch import resolve_unit, unit_name
    from vlmexp.recipe import run_fold_task

    assert unit_name(run_fold_task) == "vlmexp.recipe:run_fold_task"
    assert resolve_unit(unit_name(run_fold_task)) is run_fold_task


def test_task_without_the_run_folder_fails_clearly(tmp_path):
    from vlmexp.recipe import run_fold_task

    cfg = load_config([f"runs_dir={tmp_path / 'runs'}", "name=elsewhere"])
    with pytest.raises(FileNotFoundError, match=r"cannot see the run folder .*elsewhere.*same path"):
        run_fold_task(cfg, 0)
    assert not (tmp_path / "runs").exists()  # nothing created on the node that cannot see the storage


def test_gpus_per_fold_and_ray_keys_are_validated():
    from vlmexp.config import ConfigError, config_hash

    with pytest.raises(ConfigError):
        load_config(["train.gpus_per_fold=0"])
    with pytest.raises(ConfigError):
        load_config(["launcher=slurm"])
    # Where the folds run does not change the results: same run name and hash.
    assert config_hash(load_config(["launcher=ray", "ray.address=auto"])) == config_hash(load_config([]))
