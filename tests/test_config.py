from pathlib import Path

import pytest

from vlmexp.cli import expand_grid
from vlmexp.config import (
    Config,
    ConfigError,
    config_hash,
    diff_from_defaults,
    load_config,
    nearest_key,
    run_name,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def exp_dir(tmp_path):
    (tmp_path / "mine.yaml").write_text("prompt: label_desc\nfolds: 3\ntrain:\n  lr: 0.001\n  epochs: 2\n")
    return tmp_path


def test_defaults_load():
    cfg = load_config([])
    assert cfg == Config()


def test_precedence_defaults_yaml_cli(exp_dir):
    cfg = load_config(["experiment=mine", "folds=4", "train.lr=1e-5"], experiments_dir=exp_dir)
    assert cfg.prompt == "label_desc"  # from the YAML
    assert cfg.train.epochs == 2  # from the YAML
    assert cfg.folds == 4  # argument beats YAML
    assert cfg.train.lr == 1e-5  # nested argument beats YAML
    assert cfg.lora.r == 16  # default untouched


def test_nested_and_list_overrides():
    cfg = load_config(["lora.r=32", "lora.modules_to_save=[lm_head]", "ocr.enabled=true"])
    assert cfg.lora.r == 32 and cfg.lora.modules_to_save == ["lm_head"] and cfg.ocr.enabled is True


@pytest.mark.parametrize(
    "arg, suggestion",
    [("lr=1e-4", "train.lr"), ("train.lrr=1", "train.lr"), ("prmpt=x", "prompt"), ("lora.rank=8", "lora.r")],
)
def test_unknown_key_names_nearest(arg, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config([arg])


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epoch.*did you mean 'train\.epochs'"):
        load_config(["experiment=bad"], experiments_dir=tmp_path)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="folds.*expected int"):
        load_config(["folds=five"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match="predict.mode=vote.*score, generate"):
        load_config(["predict.mode=vote"])


def test_bad_values():
    with pytest.raises(ConfigError, match="at least 2 folds"):
        load_config(["folds=1"])
    with pytest.raises(ConfigError, match="min_agree"):
        load_config(["pseudo.min_agree=5"])
    with pytest.raises(ConfigError, match="base_url"):
        load_config(["predict.backend=openai"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(["prompt"])


def test_missing_experiment_lists_available(exp_dir):
    with pytest.raises(ConfigError, match="experiments here: mine"):
        load_config(["experiment=nope"], experiments_dir=exp_dir)


def test_hash_is_stable_and_ignores_name():
    a = load_config(["prompt=label_desc"])
    b = load_config(["prompt=label_desc", "name=my-run", "runs_dir=/tmp/elsewhere"])
    c = load_config(["prompt=label_desc", "lora.r=8"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert run_name(b) == "my-run" and run_name(a) == f"label_desc-{config_hash(a)}"
    assert diff_from_defaults(c) == {"prompt": "label_desc", "lora.r": 8}


def test_nearest_key_prefers_leaf():
    assert nearest_key("epochs") == "train.epochs"
    assert nearest_key("max_pixel") == "image.max_pixels"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_loads(path):
    cfg = load_config([f"experiment={path.stem}"], experiments_dir=ROOT / "experiments")
    assert cfg.experiment == path.stem
    assert diff_from_defaults(cfg), f"{path.name} changes nothing: an experiment YAML holds only differences"


def test_expand_grid():
    grid = expand_grid(["prompt=baseline,label_desc", "lora.r=8,16", "lora.modules_to_save=[a,b]"])
    assert len(grid) == 4
    assert ["prompt=label_desc", "lora.r=8", "lora.modules_to_save=[a,b]"] in grid
