"""A config's identity: the hash of everything that changes results, the run name, the differences
from the defaults and the YAML as written (environment values unresolved)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import OmegaConf

from vlmexp.config.schema import _UNHASHED, Config


def to_dict(cfg: Config) -> dict:
    """Every field as the code sees it (environment values resolved): what the hash covers."""
    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    d.pop("interpolations", None)
    return d


def _as_written(cfg: Config) -> dict:
    """`to_dict` with every environment value back as written, e.g. "${oc.env:OPENAI_API_KEY}"."""
    d = to_dict(cfg)
    for key, text in cfg.interpolations.items():
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            node = node[part]
        node[leaf] = text
    return d


def to_yaml(cfg: Config) -> str:
    """The config as written (environment values unresolved): loading it back resolves them again."""
    return OmegaConf.to_yaml(OmegaConf.create(_as_written(cfg)))


def changes_results(key: str) -> bool:
    """Whether a dotted key can change a run's results: False for `runs_dir`, `speed.compile`, ..."""
    return key not in _UNHASHED and key.split(".")[0] not in _UNHASHED


def config_hash(cfg: Config) -> str:
    """Stable 8-hex hash of everything that changes results (not name/runs_dir/experiment)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _UNHASHED}
    defaults = to_dict(Config())
    for key in (k for k in _UNHASHED if "." in k):
        # Reset to its default rather than dropped: runs that never set it keep the hash they had.
        section, leaf = key.split(".")
        d[section][leaf] = defaults[section][leaf]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def diff_from_defaults(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every field that differs from the defaults, e.g. {"lora.r": 32}."""
    # As written: this lands in overrides.json and the git-tracked leaderboard, so an API key read
    # with ${oc.env:...} stays that text.
    base, mine = _leaves(to_dict(Config())), _leaves(_as_written(cfg))
    return {k: v for k, v in mine.items() if base.get(k, _ABSENT) != v and k.split(".")[0] not in _UNHASHED}


_ABSENT = object()


def _leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": 8}} -> {"lora.r": 8}; lists stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _leaves(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_name(cfg: Config) -> str:
    return cfg.name or f"{cfg.experiment or cfg.prompt}-{config_hash(cfg)}"
