"""Every shipped continual and distillation config parses (run configs are tested elsewhere)."""

from pathlib import Path

import pytest
import yaml

from lmadapt.continual.config import load_continual_config
from lmadapt.distill.runner import load_distill_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
CONTINUAL = [p for p in SHIPPED if "stream" in (yaml.safe_load(p.read_text()) or {})]
DISTILL = [p for p in SHIPPED if "teacher" in (yaml.safe_load(p.read_text()) or {})]


def test_shipped_configs_exist():
    names = {p.name for p in CONTINUAL + DISTILL}
    assert {"continual_sst2_subj_conll.yaml", "distill_sst2.yaml"} <= names
    assert "distill_smollm2_sst2.yaml" in names


@pytest.mark.parametrize("path", CONTINUAL, ids=[p.name for p in CONTINUAL])
def test_continual_config_loads(path):
    cfg = load_continual_config(path)
    assert [e.name for e in cfg.stream] and cfg.strategy.name
    for strategy in ("naive", "ewc", "l2", "replay", "lwf", "adapters"):
        assert load_continual_config(path, [f"strategy={strategy}"]).strategy.name == strategy


@pytest.mark.parametrize("path", DISTILL, ids=[p.name for p in DISTILL])
def test_distill_config_loads(path):
    cfg = load_distill_config(path)
    assert cfg.options.teacher.type in ("run", "prompt") and cfg.student.data.train
