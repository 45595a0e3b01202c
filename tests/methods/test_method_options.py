"""Method-specific behaviour: AdaLoRA's budget schedule, prompt-tuning init and L2 penalty, config
checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmadapt.api import load_run, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.methods import METHODS, build_method
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task


def _method(name: str, **options):
    return build_method(parse_section(METHODS, "name", {"name": name, **options}, "method"))


@pytest.fixture(scope="module")
def task():
    return build_task(
        parse_section(TASKS, "type", "classification", "task"), {"labels": ["neg", "pos"]}
    )


def test_adalora_prunes_to_its_budget_on_the_trainer_schedule(run_config, monkeypatch):
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    cfg = run_config(
        method={"name": "adalora", "init_r": 4, "target_r": 2},
        train={"max_steps": 10, "eval_every": 5, "lr": 1e-2},
    )
    run_dir = train(build_run_config(cfg))["run_dir"]
    saved = json.loads(Path(run_dir, "model", "adapter_config.json").read_text())
    assert (saved["total_step"], saved["tinit"], saved["tfinal"]) == (10, 1, 3)
    ranks = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert len(ranks) == 4 and sum(ranks) <= 2 * len(ranks)  # target_r x adapted matrices
    model = load_run(run_dir).model
    kept = {n: p.shape[0] for n, p in model.named_parameters() if ".lora_E." in n}
    assert sorted(kept.values()) == sorted(ranks)


def test_adalora_orthogonal_penalty_is_a_loss_term(task, tiny_bert):
    method = _method("adalora", orth_reg_weight=0.5)
    model = method.apply(task.build_model(resolve_model(tiny_bert)), task)
    (hook,) = method.hooks(model, 100)

    class _Trainer:
        pass

    trainer = _Trainer()
    trainer.model = model
    hook.on_train_start(trainer)
    term = hook.loss_term(model, {}, None)
    hook.on_train_end(trainer)
    assert term.requires_grad and float(term.detach()) > 0


def test_prompt_tuning_text_init_uses_the_text_embeddings(task, tiny_bert):
    spec = resolve_model(tiny_bert)
    method = _method("prompt_tuning", init="text", init_text="great movie", num_virtual_tokens=3)
    model = method.apply(task.build_model(spec), task)
    ids = load_tokenizer(spec)("great movie")["input_ids"]  # [CLS] great movie [SEP] -> first 3
    words = model.get_input_embeddings().weight[ids[:3]]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, words)


def test_prompt_tuning_l2_penalty(task, tiny_bert):
    assert _method("prompt_tuning").hooks(None, 10) == []
    method = _method("prompt_tuning", l2_penalty=0.5, num_virtual_tokens=4)
    model = method.apply(task.build_model(resolve_model(tiny_bert)), task)
    (hook,) = method.hooks(model, 10)
    prompt = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(hook.loss_term(model, {}, None), 0.5 * prompt.pow(2).sum())


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("adalora", {"target_r": 8, "init_r": 4}, "method.init_r"),
        ("adalora", {"tinit_ratio": 0.6, "tfinal_ratio": 0.5}, "method.tfinal_ratio"),
        ("adalora", {"beta1": 1.0}, "method.beta1"),
        ("ia3", {"feedforward_modules": ["output.dense"]}, "method.feedforward_modules"),
        ("prompt_tuning", {"init": "text"}, "method.init_text"),
        ("prompt_tuning", {"l2_penalty": -1}, "method.l2_penalty"),
        ("prefix_tuning", {"num_virtual_tokens": 0}, "method.num_virtual_tokens"),
        ("prefix_tuning", {"encoder_hidden_size": 64}, "method.encoder_hidden_size"),
        ("p_tuning", {"encoder": "GRU"}, "method.encoder"),
        ("p_tuning", {"encoder_dropout": 1.0}, "method.encoder_dropout"),
    ],
)
def test_bad_options_name_their_field(name, options, field):
    with pytest.raises(ConfigError) as e:
        _method(name, **options)
    assert e.value.field == field
