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
