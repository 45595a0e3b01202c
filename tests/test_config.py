import dataclasses
from pathlib import Path

import pytest
import yaml

from lmadapt.config import build_run_config, load_config
from lmadapt.errors import ConfigError
from lmadapt.schema import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def _loader(path: Path):
    """Each kind of shipped config has its own typed loader; pick it by the config's keys."""
    from lmadapt.continual.config import load_continual_config
    from lmadapt.distill.runner import load_distill_config
    from lmadapt.hpo import load_space
    from lmadapt.prompting.config import load_prompt_config

    if path.parent.name == "hpo":
        return load_space
    raw = yaml.safe_load(path.read_text()) or {}
    if "stream" in raw:
        return load_continual_config
    if "teacher" in raw:
        return load_distill_config
    if "mode" in raw or path.parent.name == "prompts":
        return load_prompt_config
    return load_config


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 10


def _leaves(node, path=()):
    """(path, value) of every scalar (or list of scalars) in a YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    elif isinstance(node, list) and any(isinstance(x, (dict, list)) for x in node):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    else:
        yield path, node


def _lookup(obj, path):
    for key in path:
        obj = obj[key] if isinstance(obj, (dict, list)) else getattr(obj, key)
    return obj


def _sections(cfg, raw):
    """(part of the file, object it must land in): distillation options sit beside the student's
    run config; a continual config's top-level `train` is every stream entry's default."""
    from lmadapt.continual.config import ContinualConfig
    from lmadapt.distill.runner import DistillConfig

    if isinstance(cfg, DistillConfig):
        options = {f.name for f in dataclasses.fields(cfg.options)}
        return [
            ({k: v for k, v in raw.items() if k in options}, cfg.options),
            ({k: v for k, v in raw.items() if k not in options}, cfg.student),
        ]
    if isinstance(cfg, ContinualConfig):
        top = raw.get("train", {})
        entries = [
            ({**top, **e.get("train", {})}, s.train) for e, s in zip(raw["stream"], cfg.stream)
        ]
        return [({k: v for k, v in raw.items() if k != "train"}, cfg), *entries]
    return [(raw, cfg)]


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    """Every value written in the file is in the typed config (no key dropped or defaulted)."""
    cfg = _loader(path)(path)
    raw = yaml.safe_load(path.read_text())
    for part, target in _sections(cfg, raw):
        for keys, expected in _leaves(part):
            got = _lookup(target, keys)
            if isinstance(expected, str) and isinstance(got, float):  # YAML 1.1 reads 1e-3 as str
                assert got == pytest.approx(float(expected)), keys
            elif isinstance(expected, str) and got != expected:  # data paths: relative to the file
                assert Path(got) == path.parent / expected, keys
            else:
                assert got == expected, keys


def _cfg(**over):
    base = {"task": {"type": "classification"}, "data": {"train": "x.csv"}}
    base.update(over)
    return base


def test_lr_as_yaml_string_is_a_float():
    cfg = build_run_config(_cfg(train={"lr": "5e-4"}))
    assert cfg.train.lr == pytest.approx(5e-4)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"bogus": 1}}, "train.bogus"),
        ({"method": {"name": "lora", "r": 0}}, "method.r"),
        ({"method": {"name": "nope"}}, "method.name"),
        ({"task": {"type": "classification", "problem": "ranking"}}, "task.problem"),
        ({"data": {"train": "x.csv", "max_train_samples": -1}}, "data.max_train_samples"),
        ({"train": {"early_stopping": {"patience": 0}}}, "train.early_stopping.patience"),
    ],
)
def test_errors_name_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        build_run_config(_cfg(**over))
    assert e.value.field == field
    assert f"'{field}'" in str(e.value)


def test_missing_data_section():
    with pytest.raises(ConfigError, match="'data'"):
        build_run_config({"task": {"type": "classification"}})


def test_overrides_are_dotted_and_typed():
    data = apply_overrides(_cfg(), ["train.lr=1e-4", "method=bitfit", "train.epochs=2"])
    cfg = build_run_config(data)
    assert cfg.method.name == "bitfit" and cfg.train.epochs == 2.0 and cfg.train.lr == 1e-4
    data = apply_overrides(_cfg(method="lora"), ["method.r=4"])
    assert build_run_config(data).method.r == 4


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {type: classification}\ndata: {train: a.csv}\ntrain: {epochs: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.epochs" in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
