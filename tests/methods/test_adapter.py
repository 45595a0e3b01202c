"""Bottleneck adapters: placement, parameter count, identity at init."""

from __future__ import annotations

import pytest
import torch

from lmadapt.errors import ConfigError
from lmadapt.methods import METHODS, build_method
from lmadapt.methods.base import count_parameters
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task


@pytest.fixture(scope="module")
def task():
    t = build_task(
        parse_section(TASKS, "type", "classification", "task"), {"labels": ["neg", "pos"]}
    )
    return t


def _adapter(**options):
    return build_method(parse_section(METHODS, "name", {"name": "adapter", **options}, "method"))


@pytest.mark.parametrize(
    ("variant", "reduction", "per_layer"),
    [("houlsby", 16, 2), ("pfeiffer", 16, 1), ("houlsby", 4, 2)],
)
def test_trainable_parameters_match_the_formula(variant, reduction, per_layer, task, tiny_bert):
    spec = resolve_model(tiny_bert)
    base = task.build_model(spec)
    d, layers = base.config.hidden_size, base.config.num_hidden_layers
    head = sum(
        p.numel() for n, p in base.named_parameters() if n.startswith(("bert.pooler", "classifier"))
    )
    model = _adapter(variant=variant, reduction_factor=reduction).apply(base, task)
    b = d // reduction
    per_adapter = 2 * d * b + b + d
    trainable, _ = count_parameters(model)
    assert trainable == layers * per_layer * per_adapter + head
    sites = [n for n, _ in model.named_modules() if n.endswith(".adapter")]
    assert len(sites) == layers * per_layer
    assert all(
        s.endswith(
            (
                "attention.output.dense.adapter",
                "layer.0.output.dense.adapter",
                "layer.1.output.dense.adapter",
            )
        )
        for s in sites
    )


def test_adapted_model_starts_as_the_base(task, tiny_bert):
    spec = resolve_model(tiny_bert)
    batch = load_tokenizer(spec)(["the film was good", "awful"], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    base = task.build_model(spec).eval()
    torch.manual_seed(0)
    adapted = _adapter().apply(task.build_model(spec), task).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, base(**batch).logits, atol=0, rtol=0)


def test_unknown_architecture_needs_explicit_modules(task, tiny_bert):
    model = task.build_model(resolve_model(tiny_bert))
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="method.ffn_modules"):
        _adapter().apply(model, task)
    custom = _adapter(variant="pfeiffer", ffn_modules=r"\.layer\.\d+\.output\.dense$")
    custom.apply(model, task)
    assert sum(n.endswith(".adapter") for n, _ in model.named_modules()) == 2


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"reduction_factor": 0}, "method.reduction_factor"),
        ({"ffn_modules": "("}, "method.ffn_modules"),
        ({"variant": "lora"}, "method.variant"),
        ({"init_std": -1}, "method.init_std"),
    ],
)
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ConfigError) as e:
        _adapter(**options)
    assert e.value.field == field
