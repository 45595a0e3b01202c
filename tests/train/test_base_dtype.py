"""train.base_dtype: a PEFT method's frozen weights held in bf16 while the trained ones stay fp32
give the loss of the fp32 base under the same bf16 autocast, and the fp32 weights come back (for
int8 too; int8's numbers: tests/train/test_int8_base.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmadapt.api import Prepared, load_run, prepare, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.inference import autocast, model_inputs
from lmadapt.methods import build_method
from lmadapt.session import apply_method, seed_everything
from lmadapt.train.bf16_base import frozen_in_bf16
from lmadapt.train.loop import set_dropout
from tests.tasks.test_generation import gen_config

METHODS = ["lora", "ia3", "bitfit", "adapter", "prompt_tuning"]


def adapted(cfg: dict) -> tuple[torch.nn.Module, Prepared, dict]:
    """The run's model as it trains (method applied, dropout off, seed 0), its data, a batch."""
    config = build_run_config(cfg)
    data = prepare(config)
    seed_everything(0)
    base = data.task.build_model(data.spec)
    model = apply_method(base, build_method(config.method), data.task, config.train)
    set_dropout(model, 0.0)
    return model, data, data.task.collator(data.tokenizer)(data.features["train"][:4])


def bf16_step(cfg: dict, bf16_base: bool) -> tuple[float, torch.Tensor, set]:
    """Loss and logits of one bf16-autocast step; the dtypes of the frozen weights."""
    model, data, batch = adapted(cfg)
    restore = frozen_in_bf16(model) if bf16_base else None
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trained == {torch.float32}
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


def _frozen_dtypes(model: torch.nn.Module) -> set:
    return {p.dtype for p in model.parameters() if not p.requires_grad}


def _int8_forwards(model: torch.nn.Module) -> bool:
    """Whether some module computes through int8_base's forward (set on the instance)."""
    return any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    ("settings", "probe", "while_training"),
    [
        ({"precision": "bf16", "base_dtype": "bf16"}, _frozen_dtypes, {torch.bfloat16}),
        ({"precision": "fp32", "base_dtype": "int8"}, _int8_forwards, True),
    ],
)
def test_a_run_trains_on_its_base_dtype_and_saves_the_fp32_model(
    run_config, settings, probe, while_training
):
    cfg = run_config(train={"max_steps": 3, "eval_every": 2, **settings})
    seen: list = []

    class Probe(Hook):
        def on_step_end(self, trainer) -> None:
            seen.append(probe(trainer.model))

    metrics = train(build_run_config(cfg), hooks=[Probe()])
    assert seen == [while_training] * 3  # while it trained, evaluation at step 2 included
    assert metrics["steps"] == 3 and metrics["dev"]["accuracy"] >= 0
    run = load_run(metrics["run_dir"], "cpu")
    assert {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert not _int8_forwards(run.model)


def test_bf16_base_needs_bf16_autocast(run_config):
    with pytest.raises(ConfigError, match="train.base_dtype"):
        build_run_config(run_config(train={"precision": "fp32", "base_dtype": "bf16"}))


def _rss_file_mb() -> float:
    """Resident pages of mapped files (Linux's RssFile), in MB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^RssFile:\s+(\d+) kB", status, re.M).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_bf16_base_hands_back_the_pages_of_the_fp32_weights(minilm_dir):
    """transformers maps the safetensors file; once cast, the fp32 originals are not kept
    resident (they were, and made a bf16-base run peak above HF Trainer's), yet come back."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir).requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights_mb = sum(p.numel() * 4 for p in before.values()) / 2**20
    resident = _rss_file_mb()  # loading read every page
    restore = frozen_in_bf16(model)
    released = resident - _rss_file_mb()
    assert released > 0.8 * weights_mb
    restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_weights_written_in_place_are_never_dropped(minilm_dir):
    """A page of the mapped file the process wrote holds its bytes, not the file's: dropping
    it would silently bring the file's back."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir).requires_grad_(False)
    weight = model.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight[1000, 5] = 123.0  # a user's edit of the loaded base, mid-tensor
    restore = frozen_in_bf16(model)
    restore()
    assert weight[1000, 5].item() == 123.0
