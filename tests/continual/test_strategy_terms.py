"""What each strategy adds to the training loss once a task is behind it, on the tiny BERT.

The learner is walked through the stream as `run_continual` does (load, activate, before_task,
after_task), without training the first task: the strategies anchor at whatever weights it left.
Then, at the start of the second task, each strategy's `Hook.loss_term` must contribute: the
EWC and L2 penalties once the weights move from the anchor, LwF's distillation term once the old
head's outputs move from the recorded ones, and replay's loss of old examples through their head.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from lmadapt.continual.config import build_continual_config
from lmadapt.continual.model import MultiTaskModel
from lmadapt.continual.runner import Learner, read_stream
from lmadapt.continual.strategies import build_strategy
from lmadapt.models import load_model, load_tokenizer, resolve_model
from lmadapt.train.loop import Trainer
from tests.continual.test_stream import _config, stream_files  # noqa: F401 (a fixture)


@dataclasses.dataclass
class Stage:
    """The learner at the start of its second task ("ner"), the first ("sent") behind it."""

    learner: Learner
    strategy: object
    old: object
    """Task slot of "sent"."""
    new: object
    """Task slot of "ner"."""
    batch: dict
    """A batch of the second task's training data."""
    config: object

    @property
    def model(self):
        return self.learner.model

    def term(self):
        """The strategy's loss term for `batch`, as the training loop asks for it."""
        return self.strategy.loss_term(self.model, self.batch, self.model(**self.batch))


def _value(term) -> float:
    return float(term.detach())


@pytest.fixture
def stage(tiny_bert, stream_files, tmp_path):  # noqa: F811
    def make(strategy: dict) -> Stage:
        config = build_continual_config(
            _config(tiny_bert, stream_files, tmp_path / "out", strategy)
        )
        spec = resolve_model(config.model)
        data, _ = read_stream(config.stream, spec)
        learner = Learner(
            MultiTaskModel(load_model(spec, AutoModel)),
            load_tokenizer(spec),
            spec,
            build_strategy(config.strategy),
            config.seed,
            16,
        )
        s = learner.strategy
        old = learner.load(config.stream[0], data[0])
        learner.model.eval()  # no dropout: equal inputs give equal outputs
        learner.activate(old.name)
        s.before_task(learner, old)
        first = old.collator(old.train_features[:4])
        assert s.loss_term(learner.model, first, learner.model(**first)) is None  # nothing yet
        s.after_task(learner, old)
        new = learner.load(config.stream[1], data[1])
        learner.model.eval()  # the new head too
        learner.activate(new.name)
        s.before_task(learner, new)
        batch = new.collator(new.train_features[:4])
        return Stage(learner, s, old, new, batch, config)

    return make


def _backbone(stage: Stage) -> list[torch.nn.Parameter]:
    return list(stage.model.backbone.parameters())


def _shift(params, by: float) -> None:
    with torch.no_grad():
        for p in params:
            p += by


@pytest.mark.parametrize("name", ["ewc", "l2"])
def test_penalty_is_zero_at_the_anchor_and_grows_with_the_distance(stage, name):
    st = stage({"name": name, "strength": 2.0, **({"fisher_samples": 8} if name == "ewc" else {})})
    at_anchor = st.term()
    assert at_anchor is not None and _value(at_anchor) == 0.0
    params = _backbone(st)
    terms = []
    for _ in range(2):  # every backbone weight 1e-3, then 2e-3, from its anchor
        _shift(params, 1e-3)
        terms.append(st.term())
    assert _value(terms[0]) > 0
    assert _value(terms[1]) == pytest.approx(4 * _value(terms[0]), rel=1e-3)  # quadratic
    # the penalty's gradient pulls every moved weight back towards the anchor
    grads = torch.autograd.grad(terms[1], params, allow_unused=True)
    assert sum(float(g.sum()) for g in grads if g is not None) > 0
    if name == "l2":  # λ/2 · Σ (θ - θ*)², unweighted: exact
        n = sum(p.numel() for p in params)
        assert _value(terms[1]) == pytest.approx(0.5 * 2.0 * n * 2e-3**2, rel=1e-3)


def test_ewc_fisher_weights_the_first_tasks_weights(stage):
    st = stage({"name": "ewc", "strength": 2.0, "fisher_samples": 8})
    fisher = st.strategy.fisher
    head = {n for n in fisher if n.startswith(f"task_models.{st.old.name}.")}
    assert head and any(n.startswith("backbone.") for n in fisher)
    assert all(float(fisher[n].sum()) > 0 for n in head)
    # the penalty is λ/2 · Σ F (θ - θ*)² over exactly those weights
    named = {n: p.detach() for n, p in st.model.named_parameters()}
    anchor = {n: named[n].clone() for n in fisher}
    _shift([named[n] for n in fisher], 1e-2)
    sq = sum(float((fisher[n] * (named[n] - anchor[n]) ** 2).sum()) for n in fisher)
    expected = 0.5 * 2.0 * sq
    assert _value(st.term()) == pytest.approx(expected, rel=1e-4)
    assert expected > 0


def test_l2_ignores_the_new_tasks_head(stage):
    st = stage({"name": "l2", "strength": 2.0})
    _shift(st.model.head_parameters(st.new.name), 1.0)
    assert _value(st.term()) == 0.0


def test_lwf_term_is_the_distillation_of_the_recorded_old_head(stage):
    st = stage({"name": "lwf", "temperature": 2.0, "weight": 0.5})
    assert set(st.strategy.targets) == {"sent"}  # the old head's outputs, recorded once
    recorded = st.model(task="sent", **st.batch).logits.detach()
    assert _value(st.term()) == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    backbone, head = _backbone(st), st.model.head_parameters("sent")
    with torch.no_grad():
        for p in backbone + head:
            p += 0.1 * torch.randn_like(p)
    term = st.term()
    # weight · T² · KL(softmax(recorded / T) || softmax(now / T)), mean over the batch
    now = st.model(task="sent", **st.batch).logits.detach()
    log_old, log_now = F.log_softmax(recorded / 2.0, -1), F.log_softmax(now / 2.0, -1)
    kl = (log_old.exp() * (log_old - log_now)).sum(-1).mean()
    assert _value(term) > 1e-3
    assert _value(term) == pytest.approx(0.5 * 2.0**2 * float(kl), rel=1e-4)
    # its gradient reaches the old head and the shared backbone
    grads = torch.autograd.grad(term, head + backbone, allow_unused=True)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads[: len(head)])
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads[len(head) :])


def _rows(input_ids, attention_mask) -> list[tuple[int, ...]]:
    return [tuple(r[:n]) for r, n in zip(input_ids.tolist(), attention_mask.sum(-1).tolist())]


def test_replay_term_is_the_old_tasks_loss_on_buffered_old_examples(stage):
    st = stage({"name": "replay", "buffer_size": 10, "batch_size": 4, "weight": 0.5})
    buffer = st.strategy.buffer
    old_rows = {tuple(f["input_ids"]) for f in st.old.train_features}
    assert len(buffer) == 10 and all(name == "sent" for name, _ in buffer.items)
    assert {tuple(f["input_ids"]) for _, f in buffer.items} <= old_rows
    drawn = []
    sample = buffer.sample

    def recorded_sample(k):
        items = sample(k)
        drawn.extend(items)
        return items

    buffer.sample = recorded_sample
    term = st.term()
    assert len(drawn) == 4
    replay = st.old.collator([f for _, f in drawn])
    with torch.no_grad():
        old_loss = float(st.old.task.loss(st.model(task="sent", **replay).logits, replay))
    assert _value(term) == pytest.approx(0.5 * old_loss, rel=1e-5)
    # the old head learns from it, though the current batch never goes through that head
    head = st.model.head_parameters("sent")
    grads = torch.autograd.grad(term, head, allow_unused=True)
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_replay_mixes_old_examples_into_every_training_step(stage, tmp_path):
    st = stage({"name": "replay", "buffer_size": 10, "batch_size": 4})
    old_rows = {tuple(f["input_ids"]) for f in st.old.train_features}
    seen: list[list[tuple[int, ...]]] = []

    def spy(module, args, kwargs):
        seen.append(_rows(kwargs["input_ids"], kwargs["attention_mask"]))

    head = st.model.task_models["sent"]
    handle = head.register_forward_pre_hook(spy, with_kwargs=True)
    before = [p.detach().clone() for p in st.model.head_parameters("sent")]
    cfg = dataclasses.replace(st.config.stream[1].train, max_steps=3, batch_size=4)
    run_dir = tmp_path / "step1"
    run_dir.mkdir()
    trainer = Trainer(
        st.model,
        st.new.task,
        st.new.train_features,
        st.new.collator,
        cfg,
        1e-3,
        run_dir,
        hooks=[st.strategy],
    )
    trainer.fit()
    handle.remove()
    # one replay batch of 4 old examples per step, through the old head
    assert len(seen) == 3 and all(len(rows) == 4 and set(rows) <= old_rows for rows in seen)
    after = st.model.head_parameters("sent")
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
