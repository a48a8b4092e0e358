"""The experiment config: dataclasses are the schema, OmegaConf merges the layers.

Layers, later wins: the defaults below < `experiments/<experiment>.yaml` < `key=value` arguments.
Every field has a default and a one-line comment; `exp config` prints the resolved result.

schema.py (the dataclasses), load.py (the layers), checks.py (values and combinations),
identity.py (hash, run name, YAML); everything is imported from `vlmexp.config`.
"""

from __future__ import annotations

from vlmexp.config.checks import validate
from vlmexp.config.identity import (
    changes_results,
    config_hash,
    diff_from_defaults,
    run_name,
    to_dict,
    to_yaml,
)
from vlmexp.config.load import EXPERIMENTS_DIR, experiment_path, load_config, load_config_file
from vlmexp.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EnsembleConfig,
    ImageConfig,
    LoraConfig,
    ModelConfig,
    OcrConfig,
    PredictConfig,
    PromptConfig,
    PseudoConfig,
    Range,
    RayConfig,
    SpeedConfig,
    TrainConfig,
    _all_keys,
    _field,
    choice,
    nearest_key,
    ranged,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EXPERIMENTS_DIR",
    "EnsembleConfig",
    "ImageConfig",
    "LoraConfig",
    "ModelConfig",
    "OcrConfig",
    "PredictConfig",
    "PromptConfig",
    "PseudoConfig",
    "Range",
    "RayConfig",
    "SpeedConfig",
    "TrainConfig",
    "_all_keys",
    "_field",
    "changes_results",
    "choice",
    "config_hash",
    "diff_from_defaults",
    "experiment_path",
    "load_config",
    "load_config_file",
    "nearest_key",
    "ranged",
    "run_name",
    "to_dict",
    "to_yaml",
    "validate",
]
