"""train.base_dtype: a PEFT method's frozen weights held in bf16 while the trained ones stay fp32
give the loss of the fp32 base under the same bf16 autocast, and the fp32 weights come back."""

from __future__ import annotations

import pytest
import torch

from lmadapt.api import load_run, prepare, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.inference import autocast, model_inputs
from lmadapt.methods import build_method
from lmadapt.session import apply_method, seed_everything
from lmadapt.train.loop import frozen_in_bf16, set_dropout
from tests.tasks.test_generation import gen_config

METHODS = ["lora", "ia3", "bitfit", "adapter", "prompt_tuning"]


def bf16_step(cfg: dict, bf16_base: bool) -> tuple[float, torch.Tensor, set]:
    """Loss and logits of one bf16-autocast step; the dtypes of the frozen weights."""
    config = build_run_config(cfg)
    data = prepare(config)
    seed_everything(0)
    base = data.task.build_model(data.spec)
    model = apply_method(base, build_method(config.method), data.task, config.train)
    set_dropout(model, 0.0)
    restore = frozen_in_bf16(model) if bf16_base else None
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.float32}
    batch = data.task.collator(data.tokenizer)(data.features["train"][:4])
    with autocast(True):
        out = model(**model_inputs(batch), **data.task.forward_kwargs(model, batch))
    loss = data.task.loss(out.logits, batch)
    loss.backward()  # mixed dtypes backpropagate (into fp32 gradients)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    if restore:
        restore()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    return loss.item(), out.logits.detach().float(), frozen


@pytest.mark.parametrize("method", METHODS)
def test_bf16_base_gives_the_loss_of_the_fp32_base(method, run_config):
    cfg = run_config(method={"name": method})
    loss, logits, frozen = bf16_step(cfg, bf16_base=False)
    loss16, logits16, frozen16 = bf16_step(cfg, bf16_base=True)
    assert frozen == {torch.float32} and torch.bfloat16 in frozen16
    # autocast already runs the matmuls in bf16: only the rounding of the stored weights differs
    assert loss16 == pytest.approx(loss, rel=2e-2)
    assert torch.allclose(logits16, logits, atol=0.05 * logits.abs().max().item())


def test_bf16_base_on_a_causal_lm(tmp_path, tiny_llama):
    loss, _, frozen = bf16_step(gen_config(tmp_path, tiny_llama), bf16_base=False)
    loss16, _, frozen16 = bf16_step(gen_config(tmp_path, tiny_llama), bf16_base=True)
    assert frozen16 == {torch.bfloat16}  # every frozen weight
    assert loss16 == pytest.approx(loss, rel=2e-2)


def test_a_bf16_base_run_saves_the_fp32_model(run_config):
    cfg = run_config(
        train={"max_steps": 3, "precision": "bf16", "base_dtype": "bf16", "eval_every": 2}
    )
    seen: list[set] = []

    class Dtypes(Hook):
        def on_step_end(self, trainer) -> None:
            seen.append({p.dtype for p in trainer.model.parameters() if not p.requires_grad})

    metrics = train(build_run_config(cfg), hooks=[Dtypes()])
    assert seen == [{torch.bfloat16}] * 3  # while it trained
    assert metrics["steps"] == 3 and metrics["dev"]["accuracy"] >= 0
    run = load_run(metrics["run_dir"], "cpu")
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}


def test_bf16_base_needs_bf16_autocast(run_config):
    with pytest.raises(ConfigError, match="train.base_dtype"):
        build_run_config(run_config(train={"precision": "fp32", "base_dtype": "bf16"}))
