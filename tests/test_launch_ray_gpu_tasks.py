"""launcher=ray on a node with GPUs: each fold task asks for its GPU and runs in a worker of its own.

Ray is told the node has 1 GPU (it need not exist: Ray only counts it and sets CUDA_VISIBLE_DEVICES),
and the unit is a stand-in that records its process, so no model is trained here."""

from __future__ import annotations

import json

import pytest

from vlmexp.config import load_config
from vlmexp.launch import FoldJob, ray_tasks

ray = pytest.importorskip("ray", reason="launcher=ray needs the [ray] extra")


def test_gpu_fold_tasks_never_reuse_a_worker(tmp_path):
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=0)
    try:

        def unit(cfg, k):  # defined here, so Ray ships it by value
            import os

            seen = {"pid": os.getpid(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
            (tmp_path / f"fold{k}.json").write_text(json.dumps(seen))
            return {"fold": k}

        cfg = load_config([])
        finished = []
        ray_tasks.run_folds([FoldJob("r", cfg, k) for k in (0, 1)], ["r"], unit, finished.append, cfg.ray)
    finally:
        ray.shutdown()
    seen = [json.loads((tmp_path / f"fold{k}.json").read_text()) for k in (0, 1)]
    assert finished == ["r"]
    assert [s["gpus"] for s in seen] == ["0", "0"]  # each task was given the GPU
    # A reused worker would keep the CUDA context of its first GPU (and that fold's caches).
    assert seen[0]["pid"] != seen[1]["pid"]
