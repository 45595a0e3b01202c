"""Every method on the tiny random BERT: trains on a fixed batch, touches only its own parameters,
and survives save -> load with identical logits."""

from __future__ import annotations

import re

import pytest
import torch

from lmadapt.config import TrainConfig
from lmadapt.methods import METHODS, build_method
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.train.loop import Trainer, set_dropout

HEAD = r"(pooler|classifier)\."
PEFT_HEAD = r"modules_to_save\.default\."
# method -> regex of the parameter names that must train (everything else stays bit-identical)
INTENDED = {
    "full": r".",
    "bitfit": rf"(\.bias$|{HEAD})",
    "lora": rf"(\.lora_[AB]\.|{PEFT_HEAD})",
    "adalora": rf"(\.lora_[ABE]\.|{PEFT_HEAD})",
    "ia3": rf"(\.ia3_l\.|{PEFT_HEAD})",
    "prompt_tuning": rf"(^prompt_encoder\.|{PEFT_HEAD})",
    "prefix_tuning": rf"(^prompt_encoder\.|{PEFT_HEAD})",
    "p_tuning": rf"(^prompt_encoder\.|{PEFT_HEAD})",
    "adapter": rf"(\.adapter\.(down|up)\.|{HEAD})",
}
STEPS = 12
LR = 1e-2
"""One learning rate for all: the random tiny model needs large steps to move in 12 of them."""


def test_matrix_covers_every_method():
    assert sorted(INTENDED) == sorted(METHODS.names())


@pytest.fixture(scope="module")
def fixed(tiny_bert, tmp_path_factory):
    """Task, model spec, a fixed set of 8 labelled features (one batch) and the collator.

    The batch is 6 pos / 2 neg: the random tiny BERT maps all inputs to nearly the same vector,
    so a balanced batch would sit at loss ln 2 whatever is trained.
    """
    from tests.conftest import sentiment_rows, write_csv

    rows = sentiment_rows(16, seed=3)
    rows = [r for r in rows if r[1] == "pos"][:6] + [r for r in rows if r[1] == "neg"][:2]
    path = write_csv(tmp_path_factory.mktemp("data") / "train.csv", rows)
    task = build_task(parse_section(TASKS, "type", "classification", "task"))
    examples = task.read(str(path), "auto")
    task.fit(examples)
    spec = resolve_model(tiny_bert)
    tokenizer = load_tokenizer(spec)
    return task, spec, task.encode(examples, tokenizer), task.collator(tokenizer)


@torch.no_grad()
def _eval(model: torch.nn.Module, task, batch) -> tuple[torch.Tensor, float]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return logits, float(task.loss(logits, batch))


@pytest.mark.parametrize("name", list(INTENDED))
def test_method_trains_only_its_parameters_and_reloads(name, fixed, tmp_path, monkeypatch):
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    task, spec, features, collate = fixed
    batch = collate(features)
    method = build_method(parse_section(METHODS, "name", name, "method"))
    torch.manual_seed(0)
    model = method.apply(task.build_model(spec), task)
    set_dropout(model, 0.0)  # a deterministic objective: the fixed batch's loss must fall
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, loss_before = _eval(model, task, batch)

    cfg = TrainConfig(
        max_steps=STEPS,
        batch_size=len(features),
        eval_every=10 * STEPS,
        log_every=STEPS,
        warmup_ratio=0.0,
        precision="fp32",
        group_by_length=False,
    )
    trainer = Trainer(model, task, features, collate, cfg, LR, tmp_path)
    trainer.hooks += method.hooks(model, trainer.total_steps())
    trainer.fit()

    logits, loss_after = _eval(model, task, batch)
    assert loss_after < loss_before, f"{name}: loss {loss_before:.4f} -> {loss_after:.4f}"

    intended = re.compile(INTENDED[name])
    changed = []
    for n, p in model.named_parameters():
        assert p.requires_grad == bool(intended.search(n)), (
            f"{name}: {n} trainable={p.requires_grad}"
        )
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"
        elif not torch.equal(p, before[n]):
            changed.append(n)
    own = [n for n in changed if not re.search(rf"{HEAD}|{PEFT_HEAD}", n)]
    assert own, f"{name}: none of the method's own parameters changed"

    method.save(model, tmp_path / "model")
    loaded = method.load(task, spec, tmp_path / "model")
    reloaded, _ = _eval(loaded, task, batch)
    torch.testing.assert_close(reloaded, logits, atol=1e-6, rtol=0)


def test_prefix_tuning_refused_cleanly_where_the_model_takes_no_prefixes(fixed, monkeypatch):
    """transformers 5.24 renamed BERT's `past_key_values` to `cache`, and peft then failed with a
    ValueError at the first forward; lmadapt must refuse at set-up with a config error instead."""
    from transformers import BertModel

    from lmadapt.errors import ConfigError
    from lmadapt.methods.prefix_tuning import takes_prefixes

    task, spec, _, _ = fixed
    method = build_method(parse_section(METHODS, "name", "prefix_tuning", "method"))
    assert takes_prefixes(task.build_model(spec))  # the locked versions support it

    def renamed(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(BertModel, "forward", renamed)
    with pytest.raises(ConfigError, match="p_tuning or prompt_tuning") as e:
        method.apply(task.build_model(spec), task)
    assert e.value.field == "method.name"
