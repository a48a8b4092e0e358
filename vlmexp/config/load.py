"""Loading: defaults < `experiments/<experiment>.yaml` < `key=value` arguments, merged by OmegaConf;
unknown keys name the nearest valid one, environment values never name a run."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vlmexp.config.checks import check_prompt, validate
from vlmexp.config.schema import Config, ConfigError, _all_keys, _field, nearest_key

EXPERIMENTS_DIR = Path("experiments")


def _check_keys(dotlist: list[str], source: str) -> None:
    valid = set(_all_keys())
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"{source}: '{item}' is not key=value; write e.g. prompt=label_desc")
        key = item.split("=", 1)[0].lstrip("+")
        if key in _SECTIONS:
            example = next(k for k in _all_keys() if k.startswith(key + ".") and k not in _SECTIONS)
            raise ConfigError(f"{source}: '{key}' is a section; set a key inside it, e.g. {example}=...")
        if key not in valid and not key.startswith("train.args."):  # trainer options: checked in validate
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{nearest_key(key)}'?")


_SECTIONS = {k.rsplit(".", 1)[0] for k in _all_keys() if "." in k}  # e.g. "data", "train", "train.args"


def _read_experiment(path: Path) -> dict:
    """An experiment YAML's mapping; a file that is not one fails naming the file and the line."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: holds a {type(raw).__name__}, not a mapping of settings; write e.g. 'folds: 5' "
            "and 'train: {lr: 1.0e-4}', one key per line"
        )
    return raw


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


# The experiments shipped with the checkout (e.g. demo.yaml), found when the current folder has none of
# that name: `exp run experiment=demo` from /tmp/comp read ./experiments only and found nothing.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "experiments"


def experiment_path(name: str, experiments_dir: Path | None = None) -> Path:
    """experiments/<name>.yaml of the current folder (or `experiments_dir`), else the shipped one."""
    name = name.removesuffix(".yaml")  # experiment=demo.yaml means demo
    dirs = [experiments_dir or EXPERIMENTS_DIR]
    if experiments_dir is None and SHIPPED_DIR.is_dir() and SHIPPED_DIR.resolve() != dirs[0].resolve():
        dirs.append(SHIPPED_DIR)
    for d in dirs:
        if (d / f"{name}.yaml").exists():
            return d / f"{name}.yaml"
    have = sorted({p.stem for d in dirs if d.exists() for p in d.glob("*.yaml")})
    near = difflib.get_close_matches(name, have, n=1)
    hint = f"did you mean '{near[0]}'? " if near else ""
    raise ConfigError(
        f"experiment '{name}': no file {' or '.join(str(d / f'{name}.yaml') for d in dirs)}; "
        f"{hint}experiments: {', '.join(have) or 'none'}"
    )


def load_config(overrides: list[str] | None = None, experiments_dir: Path | None = None) -> Config:
    """Resolve defaults < experiment YAML < key=value overrides into a validated Config."""
    overrides = list(overrides or [])
    _check_keys(overrides, "argument")
    cfg: DictConfig = OmegaConf.structured(Config)
    cli = _merge(OmegaConf.structured(Config), _dotlist(overrides), "argument")
    _refuse_env_names(_env_values(OmegaConf.to_container(cli, resolve=False)), "argument")
    experiment = cli.experiment.removesuffix(".yaml")  # experiment=demo.yaml names the run demo-...
    path, from_yaml = None, set()  # the experiment YAML and the keys it sets, e.g. {"train.lr"}
    if experiment:
        path = experiment_path(experiment, experiments_dir)
        raw = _cleared(_read_experiment(path))
        if "experiment" in raw:
            raise ConfigError(
                f"{path}: an experiment YAML cannot name another experiment ('experiment: "
                f"{raw['experiment']}'); copy the settings it needs into this file"
            )
        flat = _flatten(raw)
        _check_keys(flat, str(path))
        cfg = _merge(cfg, OmegaConf.create(raw), str(path))
        from_yaml = {item.split("=", 1)[0] for item in flat}
    cfg = _merge(cfg, _dotlist(overrides), "argument")
    cfg.experiment = experiment
    try:
        config = _to_config(cfg, "argument")
    except ConfigError as e:
        # A bad value the YAML set (and no argument overrode) names the file: "'folds=1' is out of range"
        # alone sent users looking through their command line.
        given = {item.split("=", 1)[0].lstrip("+") for item in overrides}
        keys = re.findall(r"'([\w.]+)=", str(e))
        if keys and all(k in from_yaml and k not in given for k in keys):
            raise ConfigError(f"{path}: {e}") from None
        raise
    check_prompt(config)
    return config


def load_config_file(path: Path, overrides: list[str] | None = None) -> Config:
    """The Config saved in a run folder's config.yaml (a full dump), plus optional key=value overrides."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    if overrides:
        _check_keys(overrides, "argument")
        cfg = _merge(cfg, _dotlist(overrides), "argument")
    return _to_config(cfg, str(path))


def _dotlist(overrides: list[str]) -> DictConfig:
    try:
        layer = OmegaConf.to_container(OmegaConf.from_dotlist(overrides))
    except yaml.YAMLError as e:
        raise ConfigError(
            f"argument: cannot parse {' '.join(overrides)!r}: {str(e).splitlines()[0]}; "
            "quote values with brackets or colons, e.g. 'lora.target_modules=[q_proj,v_proj]'"
        ) from None
    return OmegaConf.create(_cleared(layer))


def _cleared(layer: dict, prefix: str = "") -> dict:
    """An empty value clears a text option to "" and a list option to [] (`data.answers_csv=` turns the
    answers file off) instead of failing on None; other fields keep None, which their type refuses."""
    out = {}
    keys = set(_all_keys())
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            v = _cleared(v, key + ".")
        elif v is None and key in keys:
            kind = str(_field(key).type)
            v = {"str": "", "list": [], "dict": {}}.get(kind.split("[")[0])
        out[k] = v
    return out


# A value read from outside the config calls a resolver, e.g. "${oc.env:OPENAI_API_KEY}"; "${prompt}"
# (another key's value) does not.
_RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")


# Keys that become folder names and leaderboard rows: they must be written out, not read from outside.
_NAMING = ("name", "experiment", "prompt")


def _env_values(raw: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value as written} of every value that calls a resolver, at any depth of `raw`."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key == "interpolations":
            continue
        if isinstance(v, dict):
            out |= _env_values(v, key + ".")
        elif any(isinstance(x, str) and _RESOLVER.search(x) for x in (v if isinstance(v, list) else [v])):
            out[key] = v
    return out


def _refuse_env_names(written: dict[str, Any], source: str) -> None:
    for key in _NAMING:
        if key in written:
            raise ConfigError(
                f"{source}: '{key}={written[key]}': {key} becomes part of the run folder name and the "
                f"leaderboard, so it cannot come from the environment; write it out, e.g. {key}=my-run"
            )


def _to_config(cfg: DictConfig, source: str) -> Config:
    """The validated Config of a merged DictConfig; environment values resolved, and kept as written in
    `Config.interpolations` for everything printed (names, config.yaml, overrides.json, the leaderboard)."""
    written = _env_values(OmegaConf.to_container(cfg, resolve=False))
    _refuse_env_names(written, source)
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{source}: cannot resolve '{e.full_key}': {str(e).splitlines()[0]}; "
            "e.g. export the environment variable it reads"
        ) from None
    config.interpolations = written
    validate(config)
    return config


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except (ValidationError, ConfigKeyError) as e:
        key = e.full_key or "?"
        want = getattr(_field(key), "type", "?") if key in set(_all_keys()) else "?"
        msg = (e.msg or str(e) or type(e).__name__).splitlines()[0]
        hint = ""
        if str(want).startswith("list"):  # lora.modules_to_save=lm_head: OmegaConf's message names its nodes
            hint = f"; write a list, e.g. {key}=[a,b] (quoted in a shell: '{key}=[a,b]')"
        raise ConfigError(f"{source}: bad value for '{key}': {msg} (expected {want}){hint}") from None
