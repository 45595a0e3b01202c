"""What every export format shares: the probe inputs each export checks itself on, and the run's
model with its adapter merged into the base weights.

Its own module, below `lmadapt.export` (the format registry) and the format modules
(`export_onnx`, `export_gguf`): the registry imports each format lazily, so a format importing
the registry back would close an import loop (tests/test_layers.py refuses one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from lmadapt.api import LoadedRun, base_spec
from lmadapt.inference import model_inputs, on_model_device
from lmadapt.methods import build_method
from lmadapt.rundir import RunDir
from lmadapt.session import resolve_device
from lmadapt.tasks.capabilities import ProbeableTask

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from transformers import PreTrainedModel

    from lmadapt.tasks.base import Task

PROBE_TEXTS = [
    "the film was good",
    "A dull, lifeless script; I left before the end.",
    "Not bad at all, though the second half drags.",
    "Paris is the capital of France.",
]
"""Inputs for the exports' checks: short and long, with and without punctuation (so that a
batch of them is padded)."""


class Mergeable(Protocol):
    """What a mergeable method (lora, adalora, ia3) loads: a peft model whose tuner folds the
    adapter into the base weights and returns the bare transformers model."""

    def merge_and_unload(self) -> PreTrainedModel: ...


def probe_examples(task: Task) -> list[Any]:
    """PROBE_TEXTS as unlabelled examples of `task` (its own probe examples where plain
    sentences are not its input, e.g. a question about each for QA)."""
    if isinstance(task, ProbeableTask):
        return task.probe_examples(PROBE_TEXTS)
    return task.examples_from_texts(PROBE_TEXTS)


def probe_batch(task: Task, tokenizer: object) -> dict[str, torch.Tensor]:
    """The probe examples as one padded batch of `task`'s inputs: what every export compares
    its logits on."""
    feats = task.encode(probe_examples(task), tokenizer)
    return cast(dict[str, torch.Tensor], task.collator(tokenizer)(feats))


@torch.no_grad()
def task_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    """`model`'s logits on `batch` as the task reads them (QA: start and end stacked), fp32 on
    the CPU, in eval mode: what the exports' checks compare."""
    model.eval()
    return task.logits(on_model_device(model)(**model_inputs(batch))).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two logit tensors: every check's one number."""
    return float((a - b).abs().max())


def merged_model(run: LoadedRun, run_dir: str | Path, device: str) -> PreTrainedModel:
    """The run's model with its adapter folded into the base weights (`run.model` is merged in
    place unless its base was quantised). Only for mergeable methods (lora, adalora, ia3).

    A run over a 4/8-bit base is merged into that base dequantised: a merge into the quantised
    layers would quantise the sum again and lose the update."""
    model = run.model
    if run.config.quantize != "none":
        where = resolve_device(device)
        method = build_method(run.config.method)
        base = base_spec(run.config, run.spec, run.task, where, dequantize=True)
        model = method.load(run.task, base, RunDir(run_dir).model, run.config.trust_remote_code)
        model.to(where).eval()
    unwrap_modules_to_save(model)
    return cast(Mergeable, model).merge_and_unload()


def unwrap_modules_to_save(model: torch.nn.Module) -> None:
    """Put each trained head copy (peft's ModulesToSaveWrapper) in place of its wrapper.

    merge_and_unload does the same, but for IA3 (peft 0.21) it fails on heads without a `weight`
    (BERT's pooler); unwrapping first leaves it only the adapter layers to merge.
    """
    from peft.utils import ModulesToSaveWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        setattr(parent, child, module.unload_and_optionally_merge_module(True, False, None))
