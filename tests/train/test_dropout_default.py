"""Which dropout a run trains with: none in a frozen base by default, the model's own where the
base's weights train, `train.dropout` over both, and the task's choice (preference) over the
method's. The evidence for the default is bench/results/dropout_default.md."""

from __future__ import annotations

import pytest
import torch

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook

BERT_DROPOUT = 0.1  # the tiny BERT's hidden and attention dropout (tests/conftest.py)


class Dropouts(Hook):
    """Every dropout layer's probability as training starts, split into the base model's and
    the method's own (LoRA's `lora_dropout`)."""

    def on_train_start(self, trainer) -> None:
        self.base: set[float] = set()
        self.adapter: set[float] = set()
        for name, module in trainer.model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                (self.adapter if "lora_dropout" in name else self.base).add(module.p)


def _trained(run_config, method: dict, train_opts: dict | None = None) -> Dropouts:
    seen = Dropouts()
    cfg = run_config(method=method, train={"epochs": 1, **(train_opts or {})})
    train(build_run_config(cfg), hooks=[seen])
    return seen


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "adapter", "bitfit"])
def test_a_frozen_base_trains_without_dropout(run_config, method):
    seen = _trained(run_config, {"name": method})
    assert seen.base == {0.0}
    assert seen.adapter <= {0.0}  # LoRA's own dropout defaults to 0 too (peft's default)


def test_full_fine_tuning_keeps_the_models_dropout(run_config):
    assert _trained(run_config, {"name": "full"}).base == {BERT_DROPOUT}


def test_loras_own_dropout_is_its_setting(run_config):
    seen = _trained(run_config, {"name": "lora", "dropout": 0.2})
    assert seen.base == {0.0} and seen.adapter == {0.2}


def test_train_dropout_model_keeps_the_models_own(run_config):
    seen = _trained(run_config, {"name": "lora", "dropout": 0.2}, {"dropout": "model"})
    assert seen.base == {BERT_DROPOUT} and seen.adapter == {0.2}


def test_train_dropout_sets_every_dropout(run_config):
    seen = _trained(run_config, {"name": "lora", "dropout": 0.2}, {"dropout": 0.3})
    assert seen.base == {0.3} and seen.adapter == {0.3}


@pytest.mark.parametrize("value", ["none", 1.0, -0.1])
def test_a_bad_train_dropout_names_the_field(run_config, value):
    with pytest.raises(ConfigError, match=r"train\.dropout"):
        build_run_config(run_config(train={"dropout": value}))


def test_a_train_config_built_in_code_checks_its_dropout():
    from lmadapt.train.config import TrainConfig

    assert TrainConfig(dropout=0).dropout == 0  # an int, as code may write it, is a probability
    with pytest.raises(ConfigError, match=r"train\.dropout"):
        TrainConfig(dropout="none")  # type: ignore[arg-type]
