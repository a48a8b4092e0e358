"""`train.args.<name>=value`: any SFTConfig/TrainingArguments field reaches the trainer, checked at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmexp.config import Config, ConfigError, config_hash, diff_from_defaults, load_config
from vlmexp.engine.train_args import sft_config


def test_a_trainer_option_reaches_the_trainer_and_the_run_hash(tmp_path):
    plain = load_config([])
    cfg = load_config(["train.args.neftune_noise_alpha=5", "train.args.torch_compile=false"])
    assert cfg.train.args == {"neftune_noise_alpha": 5, "torch_compile": False}
    args = sft_config(cfg, tmp_path, model=None, run_name="r-fold0")
    assert args.neftune_noise_alpha == 5 and args.torch_compile is False
    assert sft_config(plain, tmp_path, model=None).neftune_noise_alpha is None
    # Covered by the run hash (a new run folder), and named in the leaderboard's overrides.
    assert config_hash(cfg) != config_hash(plain)
    assert diff_from_defaults(cfg)["train.args.neftune_noise_alpha"] == 5


def test_a_mistyped_trainer_option_names_the_nearest_field():
    with pytest.raises(ConfigError, match="did you mean 'train.args.neftune_noise_alpha'"):
        load_config(["train.args.neftune_noise_alfa=5"])


def test_options_the_project_sets_are_refused_with_the_key_to_use():
    with pytest.raises(ConfigError, match="set train.lr instead"):
        load_config(["train.args.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match="RunDir.checkpoint_dir"):
        load_config(["train.args.output_dir=/tmp/elsewhere"])
    # All problems at once.
    with pytest.raises(ConfigError) as e:
        load_config(["train.args.report_to=wandb", "train.args.nefutne=1", "train.args.seed=3"])
    assert all(s in str(e.value) for s in ("train.report_to", "train.args.nefutne", "set seed instead"))


def test_trainer_options_in_an_experiment_yaml(tmp_path):
    yaml = "train:\n  args:\n    neftune_noise_alpha: 5\n    dataloader_num_workers: 2\n"
    (tmp_path / "neft.yaml").write_text(yaml)
    cfg = load_config(["experiment=neft"], experiments_dir=tmp_path)
    assert cfg.train.args == {"neftune_noise_alpha": 5, "dataloader_num_workers": 2}
    # A passed option wins over the project's own default for it (dataloader_num_workers=0).
    assert sft_config(cfg, tmp_path, model=None, run_name="r").dataloader_num_workers == 2
    (tmp_path / "bad.yaml").write_text("train:\n  args:\n    neftune_alpha: 5\n")
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        load_config(["experiment=bad"], experiments_dir=tmp_path)


def test_a_value_of_the_wrong_type_is_refused_at_load():
    with pytest.raises(ConfigError, match="neftune_noise_alpha=abc': neftune_noise_alpha takes float"):
        load_config(["train.args.neftune_noise_alpha=abc"])
    with pytest.raises(ConfigError, match="torch_compile takes bool"):
        load_config(["train.args.torch_compile=maybe"])
    # Paths, dicts and enum names are what those fields take.
    ok = ["train.args.deepspeed=ds.json", "train.args.logging_strategy=epoch", "train.args.fsdp=null"]
    assert load_config(ok).train.args == {"deepspeed": "ds.json", "logging_strategy": "epoch", "fsdp": None}


def test_a_value_the_trainer_refuses_is_a_config_error(tmp_path):
    cfg = load_config(["train.args.logging_strategy=sometimes"])
    with pytest.raises(ConfigError, match="train.args"):
        sft_config(cfg, tmp_path, model=None, run_name="r")


def test_watching_a_run_does_not_change_its_hash():
    base = config_hash(Config())
    assert config_hash(load_config(["train.report_to=none", "train.save_every=50"])) == base
    with pytest.raises(ConfigError, match="tensorboard, wandb, mlflow, trackio, none"):
        load_config(["train.report_to=comet"])


def test_a_fold_checkpoints_and_reports_a_bare_trainer_does_not(tmp_path):
    cfg = load_config(["train.save_every=7"])
    fold = sft_config(
        cfg, tmp_path, model=None, run_name="demo-1a2b-fold0", group="demo-1a2b", evaluating=True
    )
    assert (fold.save_strategy, fold.save_steps, fold.save_total_limit) == ("steps", 7, 1)
    assert fold.report_to == ["tensorboard"] and fold.run_name == "demo-1a2b-fold0"
    assert fold.metric_for_best_model == "macro_f1" and fold.greater_is_better
    every_epoch = sft_config(load_config([]), Path(tmp_path), model=None, run_name="r")
    assert every_epoch.save_strategy == "epoch"
    bare = sft_config(cfg, tmp_path, model=None)
    assert bare.save_strategy == "no" and bare.report_to == []
