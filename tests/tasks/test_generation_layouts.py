"""The generation task's layout (causal or encoder-decoder) is chosen once and survives the
run's saved state; each layout provides every member the `Layout` protocol names."""

from __future__ import annotations

import typing

import pytest

from lmadapt.tasks.configs import GenerationConfig
from lmadapt.tasks.generation import GenerationTask
from lmadapt.tasks.generation_layouts import CausalLayout, Layout, Seq2SeqLayout

MEMBERS = [n for n in dir(Layout) if not n.startswith("_")] + list(typing.get_type_hints(Layout))


@pytest.mark.parametrize(
    "layout", [CausalLayout(GenerationConfig()), Seq2SeqLayout(GenerationConfig(), 0)]
)
def test_each_layout_provides_the_protocol(layout):
    assert not [m for m in set(MEMBERS) if not hasattr(layout, m)]


def test_the_layout_round_trips_through_the_task_state():
    causal = GenerationTask(GenerationConfig())
    assert not causal.seq2seq and causal.decoder_start is None
    assert causal.peft_task_type == "CAUSAL_LM" and "model_kind" not in causal.state()
    state = {"template": "plain", "labels": None, "model_kind": "seq2seq", "decoder_start": 0}
    seq2seq = GenerationTask(GenerationConfig(), state)
    assert seq2seq.seq2seq and seq2seq.decoder_start == 0
    assert seq2seq.peft_task_type == "SEQ_2_SEQ_LM" and seq2seq.state() == state
