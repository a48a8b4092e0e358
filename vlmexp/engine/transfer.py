"""Host-to-GPU copies that do not stop the host: page-locked memory and `non_blocking=True`.

A plain `tensor.to("cuda")` from pageable memory ends in a stream synchronize: the host waits until the
GPU has finished everything queued before the copy. Prediction builds each batch on the CPU while the
GPU runs the previous one (`predict.predict`), so a blocking copy there (e.g. the 32 x 25 candidate ids
of a scoring batch) would make the host wait for that whole batch and leave the GPU idle while the next
one is built. From page-locked memory the copy is queued like a kernel and the host goes on; torch's
pinned-memory allocator keeps the source block until the copy has run, so the CPU tensor may be dropped
at once. On a CPU device the tensors are returned as they are.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`, copied without a host sync when `device` is a GPU."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensors_to(batch: dict, device: torch.device | str) -> dict:
    """Every tensor of `batch` on `device` (`to_device`); other values as they are."""
    return {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def long_tensor(rows, device: torch.device | str) -> torch.Tensor:
    """A (nested) list of ints as an int64 tensor on `device`, built on the CPU, then copied without a
    host sync (`torch.tensor(rows, device="cuda")` copies with one)."""
    return to_device(torch.tensor(rows, dtype=torch.long), device)
