import re
from pathlib import Path

import pytest

from vlmexp.cli import expand_grid
from vlmexp.config import (
    Config,
    ConfigError,
    _all_keys,
    _field,
    config_hash,
    diff_from_defaults,
    load_config,
    load_config_file,
    nearest_key,
    run_name,
    to_yaml,
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
    with pytest.raises(ConfigError, match="experiments: mine"):
        load_config(["experiment=nope"], experiments_dir=exp_dir)
    with pytest.raises(ConfigError, match="did you mean 'mine'"):
        load_config(["experiment=mien"], experiments_dir=exp_dir)
    assert load_config(["experiment=mine.yaml"], experiments_dir=exp_dir).experiment == "mine"


def test_shipped_experiments_are_found_from_any_folder(tmp_path, monkeypatch):
    """`exp run experiment=demo` from a competition folder of its own found no experiments/demo.yaml."""
    monkeypatch.chdir(tmp_path)
    assert load_config(["experiment=demo"]).experiment == "demo"
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "demo.yaml").write_text("folds: 3\n")  # the folder's own comes first
    assert load_config(["experiment=demo"]).folds == 3


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


# -- ranges, prompt names, empty values, environment values (issue 10 items 5 and 9, issue 14 item 4) --


@pytest.mark.parametrize(
    "arg, allowed",
    [
        ("train.epochs=0", ">= 1"),
        ("train.lr=-1", "> 0"),
        ("lora.r=0", ">= 1"),
        ("train.batch_size=0", ">= 1"),
        ("data.limit=-5", ">= 0"),
        ("train.warmup_ratio=5", r"in \[0, 1\]"),
        ("ocr.min_confidence=7", r"in \[0, 1\]"),
        ("image.resize=-1", ">= 0"),
        ("folds=1", ">= 2"),
        ("pseudo.min_confidence=1.5", r"in \[0, 1\]"),
        ("train.lr=nan", "> 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(arg, allowed):
    key, value = arg.split("=")
    expected = rf"'{re.escape(key)}={value}.*' is out of range: .*must be {allowed}"
    with pytest.raises(ConfigError, match=expected):
        load_config([arg])


def test_range_edges_are_accepted():
    cfg = load_config(["train.epochs=1", "train.warmup_ratio=1", "data.limit=0", "ocr.min_confidence=0"])
    assert (cfg.train.epochs, cfg.train.warmup_ratio, cfg.data.limit) == (1, 1, 0)


def test_every_problem_listed_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(["train.lr=-1", "lora.r=0", "predict.mode=vote"])
    assert all(k in str(e.value) for k in ("train.lr=-1", "lora.r=0", "predict.mode=vote"))


def test_every_numeric_field_has_its_range_in_the_schema():
    # The schema is the one owner of allowed values: a new int/float field must say its range.
    numeric = [k for k in _all_keys() if str(_field(k).type) in ("int", "float")]
    assert len(numeric) > 30
    assert [k for k in numeric if "range" not in _field(k).metadata] == []


def test_unknown_prompt_names_the_nearest_template(tmp_path):
    with pytest.raises(ConfigError, match=r"prompt=label_dsc.*did you mean 'label_desc'"):
        load_config(["prompt=label_dsc"])
    (tmp_path / "mine.jinja").write_text("{% extends 'baseline.jinja' %}")
    assert load_config(["prompt=mine", f"prompts.dir={tmp_path}"]).prompt == "mine"
    with pytest.raises(ConfigError, match="did you mean 'mine'"):
        load_config(["prompt=mien", f"prompts.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="not a folder"):
        load_config([f"prompts.dir={tmp_path / 'nope'}"])


def test_empty_value_clears_a_text_or_list_option(tmp_path):
    cfg = load_config(["data.answers_csv=", "lora.modules_to_save=", "predict.base_url=", "train.args="])
    assert cfg.data.answers_csv == "" and cfg.lora.modules_to_save == [] and cfg.predict.base_url == ""
    assert cfg.train.args == {}
    (tmp_path / "x.yaml").write_text("data:\n  answers_csv: test_answers.csv\n")
    cfg = load_config(["experiment=x", "data.answers_csv="], experiments_dir=tmp_path)
    assert cfg.data.answers_csv == ""
    (tmp_path / "y.yaml").write_text("data:\n  answers_csv:\n")
    assert load_config(["experiment=y"], experiments_dir=tmp_path).data.answers_csv == ""
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(["train.lr="])  # a number has no empty value


SECRET = "sk-test-0123456789abcdef"


def test_environment_values_never_reach_names_files_or_the_leaderboard(tmp_path, monkeypatch):
    from vlmexp.rundir import RunDir

    monkeypatch.setenv("H2_TEST_KEY", SECRET)
    written = "${oc.env:H2_TEST_KEY}"
    (tmp_path / "e.yaml").write_text("predict:\n  base_url: http://h/${oc.env:H2_TEST_KEY}/v1\n")
    cfg = load_config(
        ["experiment=e", f"predict.server_model={written}", f"runs_dir={tmp_path / 'runs'}"],
        experiments_dir=tmp_path,
    )
    # The code gets the resolved values...
    assert cfg.predict.server_model == SECRET and cfg.predict.base_url == f"http://h/{SECRET}/v1"
    # ...everything printed or stored gets the text as written.
    assert SECRET not in run_name(cfg) and SECRET not in to_yaml(cfg)
    diff = diff_from_defaults(cfg)
    assert diff["predict.server_model"] == written and SECRET not in str(diff)
    run = RunDir.for_config(cfg)
    run.start(cfg, {"baseline.jinja": "x"})
    for f in run.root.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(), f
    # A saved config.yaml resolves again when loaded, and hashes the same.
    again = load_config_file(run.root / "config.yaml")
    assert again.predict.server_model == SECRET and config_hash(again) == config_hash(cfg)
    with pytest.raises(ConfigError, match=r"name=\$.*cannot come from the environment"):
        load_config([f"name={written}"])
    with pytest.raises(ConfigError, match=r"experiment=\$.*cannot come from the environment"):
        load_config([f"experiment={written}"], experiments_dir=tmp_path)
    monkeypatch.delenv("H2_TEST_KEY")
    with pytest.raises(ConfigError, match="predict.server_model"):
        load_config([f"predict.server_model={written}"])


@pytest.mark.parametrize("prompt", ["reason_label", "cot", "describe_classify"])
def test_cls_head_refuses_a_reasoning_prompt(prompt):
    # the head reads the prompt only: a reason-then-label answer would be silently dropped
    with pytest.raises(ConfigError, match=r"model.head=cls reads only the prompt.*label_desc"):
        load_config(["model.head=cls", f"prompt={prompt}"])
    assert load_config(["model.head=cls", "prompt=label_desc"]).model.head == "cls"
    assert load_config(["model.head=lm", f"prompt={prompt}"]).prompt == prompt


def test_cls_head_refuses_a_server_backend_and_generation():
    with pytest.raises(ConfigError) as e:
        load_config(["model.head=cls", "predict.backend=openai", "predict.base_url=http://h:1/v1",
                     "predict.mode=generate"])  # fmt: skip
    assert "predict.backend=local" in str(e.value) and "predict.mode=score" in str(e.value)


@pytest.mark.parametrize("arg", ["data=1", "train=abc", "lora=[1]"])
def test_a_value_for_a_whole_section_names_a_key_inside_it(arg):
    section = arg.split("=")[0]
    with pytest.raises(
        ConfigError, match=rf"'{section}' is a section; set a key inside it, e.g. {section}\.\w+="
    ):
        load_config([arg])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: [\n", r"broken\.yaml line 2: not valid YAML"),
        ("- a\n- b\n", r"broken\.yaml: holds a list, not a mapping"),
        ("data: 1\n", r"broken\.yaml: 'data' is a section"),
    ],
)
def test_an_experiment_yaml_that_is_not_a_mapping_of_settings_is_named(tmp_path, text, message):
    (tmp_path / "broken.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["experiment=broken"], experiments_dir=tmp_path)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (
            "train.scheduler=cosin",
            r"'train\.scheduler=cosin' is not a transformers name; did you mean 'cosine'",
        ),
        ("train.optim=nosuch", r"'train\.optim=nosuch' is not a transformers name.*adamw_torch_fused"),
        ("model.name=tiny:nosuch", r"'model\.name=tiny:nosuch' is not a tiny model.*tiny:qwen2_vl"),
    ],
)
def test_trainer_and_tiny_model_names_are_checked_with_the_config(arg, message):
    """They failed after the data was loaded and fold 0 had started, with a traceback."""
    with pytest.raises(ConfigError, match=message):
        load_config([arg])
    load_config(["train.scheduler=linear", "train.optim=adamw_torch_fused", "model.name=tiny:llava"])


def test_a_bad_value_set_by_an_experiment_yaml_names_the_file(tmp_path):
    (tmp_path / "f1.yaml").write_text("folds: 1\n")
    with pytest.raises(ConfigError, match=r"f1\.yaml: 'folds=1' is out of range"):
        load_config(["experiment=f1"], experiments_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^'folds=1' is out of range"):  # the argument's own value
        load_config(["experiment=f1", "folds=1"], experiments_dir=tmp_path)
    assert load_config(["experiment=f1", "folds=3"], experiments_dir=tmp_path).folds == 3


def test_an_experiment_yaml_naming_another_experiment_is_refused(tmp_path):
    """It was ignored silently: the named experiment's settings never applied."""
    (tmp_path / "nest.yaml").write_text("experiment: demo\nfolds: 3\n")
    with pytest.raises(ConfigError, match=r"nest\.yaml: an experiment YAML cannot name another experiment"):
        load_config(["experiment=nest"], experiments_dir=tmp_path)


def test_a_list_option_given_one_value_says_how_to_write_a_list():
    with pytest.raises(ConfigError, match=r"write a list, e.g. lora\.modules_to_save=\[a,b\]"):
        load_config(["lora.modules_to_save=lm_head"])
