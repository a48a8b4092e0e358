"""bench/gaps.py: GPU idle gaps charged to the host code running during them."""

from types import SimpleNamespace as NS

from torch.autograd import DeviceType

from vlmexp.bench.gaps import gap_report


def _ev(name, start, end, device=DeviceType.CPU, parent=None, stack=None):
    return NS(
        name=name, time_range=NS(start=start, end=end), device_type=device, cpu_parent=parent, stack=stack
    )


def test_gap_is_charged_to_the_innermost_host_op_and_its_callers():
    step = _ev("vlmexp/engine/train.py(324): compute_loss", 0, 5000)
    torch_frame = _ev("torch/_tensor.py(10): item", 1000, 3000, parent=step)
    sync = _ev("aten::_local_scalar_dense", 1100, 2900, parent=torch_frame)
    events = [
        step,
        torch_frame,
        sync,
        _ev("gemm", 0, 1000, DeviceType.CUDA),
        _ev("gemm", 3000, 4000, DeviceType.CUDA),
        _ev("relu", 4010, 4500, DeviceType.CUDA),  # 10 us later: launch latency, not a gap
    ]
    report = gap_report(events)
    assert "GPU idle 2.0 ms of 4.5 ms" in report
    assert "1 gaps >= 50 us" in report
    # the op and our own frame, not torch's internal one
    sig = "aten::_local_scalar_dense <- vlmexp/engine/train.py(324): compute_loss"
    assert f"2.0 ms     1 gaps  {sig}" in report
    assert "host syncs (1), by caller:" in report
    assert f"1 x      1.8 ms  {sig}" in report


def test_no_kernels_says_so():
    assert gap_report([_ev("aten::mm", 0, 10)]) == "no CUDA kernels in the profile\n"


def test_callers_come_from_the_ops_stack_where_no_python_events_nest_it():
    # torch 2.11 on the H200 recorded the frames as the op's stack, not as events around it
    item = _ev("aten::item", 1000, 3000, stack=["/tmp/site/trl/trainer/sft_trainer.py(1560): compute_loss"])
    sync = _ev("aten::_local_scalar_dense", 1100, 2900, parent=item)
    events = [item, sync, _ev("gemm", 0, 1000, DeviceType.CUDA), _ev("gemm", 3000, 4000, DeviceType.CUDA)]
    assert "aten::_local_scalar_dense <- trl/trainer/sft_trainer.py(1560): compute_loss" in gap_report(events)
