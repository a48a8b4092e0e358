"""timing.phase / recording: exclusive phase times that add up to at most the wall time."""

from __future__ import annotations

import time

import pytest
import torch

from vlmexp import timing


def test_nested_phases_count_once_and_add_up_to_at_most_the_wall():
    with timing.recording(sync=False) as timer:
        with timing.phase("train_steps"):
            time.sleep(0.03)
            with timing.phase("validation"):  # inside training: charged to validation only
                time.sleep(0.05)
        with timing.phase("train_steps"):
            time.sleep(0.01)
        time.sleep(0.02)  # no phase: "other"
    rep = timer.report()
    assert rep["calls"] == {"train_steps": 2, "validation": 1}
    assert rep["phases"]["validation"] >= 0.05
    # exclusive: training's own 0.04 s, not its 0.09 s including validation
    assert 0.04 <= rep["phases"]["train_steps"] < 0.04 + rep["phases"]["validation"]
    assert sum(rep["phases"].values()) <= rep["wall_s"]
    assert rep["other_s"] >= 0.02 - 1e-3


def test_phase_is_a_no_op_without_a_recording_and_recordings_do_not_nest():
    with timing.phase("encode"):  # nothing active: nothing recorded, nothing fails
        pass
    with timing.recording(sync=False):
        with pytest.raises(RuntimeError, match="already active"):
            with timing.recording(sync=False):
                pass


def test_torch_compile_is_recorded_as_the_compile_phase():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="eager")  # dynamo runs; no C++ toolchain
    with timing.recording(sync=False) as timer:
        with timing.phase("train_steps"):
            fn(torch.ones(3))
    rep = timer.report()
    assert rep["calls"].get("compile", 0) >= 1
    assert rep["phases"]["compile"] > 0
    # after the recording the callbacks are gone: a new compile records nothing anywhere
    from torch._dynamo.callback import callback_handler

    assert not callback_handler.start_callbacks and not callback_handler.end_callbacks


def test_garbage_collections_are_timed_and_full_ones_counted():
    import gc

    with timing.recording(sync=False) as timer:
        gc.collect()  # a full (generation 2) collection
        gc.collect(0)
    rep = timer.report()
    assert rep["gc"]["full_collections"] == 1
    assert rep["gc"]["seconds"] > 0
    assert timer.on_gc not in gc.callbacks  # the hook leaves with the recording
