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


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_launched_process_dies_with_its_parent(tmp_path):
    """kill -9 of `exp` or of a Ray worker must take its torchrun with it (a retried fold would race it)."""
    import os
    import signal
    import time

    out, pid_file = tmp_path / "child.out", tmp_path / "child.pid"
    parent_code = (
        "import subprocess; from vlmexp.launch import tied_command; "
        f"p = subprocess.Popen(tied_command('http.server', ['0', '--bind', '127.0.0.1']), "
        f"stdout=open({str(out)!r}, 'w')); open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    deadline = time.time() + 60
    while not (out.exists() and "Serving HTTP" in out.read_text()):  # the child is past die_with_parent
        assert time.time() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    try:
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
