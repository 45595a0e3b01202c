"""train.gradient_checkpointing: set in one place (session.apply_method) for every command that
trains, non-reentrant, and exact: one step with it gives the loss and gradients of one without,
for a causal LM and an encoder, under LoRA (frozen base) and full fine-tuning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmadapt.api import prepare, train
from lmadapt.config import build_run_config
from lmadapt.inference import model_inputs
from lmadapt.methods import build_method
from lmadapt.session import apply_method, seed_everything
from lmadapt.train.loop import set_dropout
from tests.tasks.test_generation import gen_config


def _block(model: torch.nn.Module) -> torch.nn.Module:
    """A module inside the first transformer block: checkpointing recomputes it (entered
    again; non-reentrant recomputation stops early, so the module may not finish)."""
    for name, module in model.named_modules():
        if name.endswith(("layers.0.mlp", "layer.0.intermediate")):
            return module
    raise AssertionError("no first block found")


def one_step(cfg: dict, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and how often the first block ran, for one fp32 step without dropout."""
    config = build_run_config(cfg)
    data = prepare(config)
    seed_everything(0)
    base = data.task.build_model(data.spec)
    train = dataclasses.replace(config.train, gradient_checkpointing=checkpointing)
    model = apply_method(base, build_method(config.method), data.task, train)
    set_dropout(model, 0.0)
    calls = []
    _block(model).register_forward_pre_hook(lambda *a: calls.append(1))
    model.train()
    batch = data.task.collator(data.tokenizer)(data.features["train"][:4])
    out = model(**model_inputs(batch), **data.task.forward_kwargs(model, batch))
    loss = data.task.loss(out.logits, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls)


def _configs(tmp_path, tiny_llama, run_config) -> dict[str, dict]:
    return {
        "llama-lora": gen_config(tmp_path, tiny_llama),
        "bert-lora": run_config(),
        "bert-full": run_config(method={"name": "full"}),
    }


@pytest.mark.parametrize("which", ["llama-lora", "bert-lora", "bert-full"])
def test_checkpointing_gives_the_same_loss_and_gradients(which, tmp_path, tiny_llama, run_config):
    cfg = _configs(tmp_path, tiny_llama, run_config)[which]
    loss, grads, calls = one_step(cfg, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = one_step(cfg, checkpointing=True)
    assert (calls, calls_ckpt) == (1, 2)  # the block really was recomputed in the backward
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], atol=1e-6, rtol=1e-5), name
    # gradients reach the first checkpointed block (LoRA's A is 0 there at init: B starts at 0)
    first = [g for n, g in grads_ckpt.items() if ".layers.0." in n or ".layer.0." in n]
    assert first and any(g.abs().sum() > 0 for g in first)


def test_a_run_with_checkpointing_trains(run_config):
    cfg = run_config(train={"max_steps": 2, "gradient_checkpointing": True})
    assert train(build_run_config(cfg))["steps"] == 2


def test_checkpointing_must_be_a_bool(run_config):
    from lmadapt.errors import ConfigError

    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        build_run_config(run_config(train={"gradient_checkpointing": "sometimes"}))
