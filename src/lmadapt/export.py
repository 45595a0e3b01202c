"""Export a trained run as a plain transformers model directory, with the adapter merged in.

Merging folds a reparameterising adapter (LoRA, AdaLoRA, IA3) into the base weights, so the
exported model needs neither peft nor lmadapt and runs at the base model's speed. Merging
changes floating-point rounding, so the export is checked: the merged model, reloaded from the
written files, must give the same logits as the unmerged one on a few inputs, or nothing is
written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from lmadapt.api import base_spec, load_run
from lmadapt.errors import LmadaptError
from lmadapt.inference import model_inputs, on_model_device
from lmadapt.io import atomic_dir, write_json
from lmadapt.methods import build_method
from lmadapt.models import ModelSpec
from lmadapt.rundir import RunDir, check_output_dir, mark
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
"""Inputs for the merged-vs-unmerged check: short and long, with and without punctuation."""


class Mergeable(Protocol):
    """What a mergeable method (lora, adalora, ia3) loads: a peft model whose tuner folds the
    adapter into the base weights and returns the bare transformers model."""

    def merge_and_unload(self) -> PreTrainedModel: ...


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    model.eval()
    return task.logits(on_model_device(model)(**model_inputs(batch))).float()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def export_merged(
    run_dir: str | Path,
    out_dir: str | Path,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Merge the run's adapter into the base model and write it to `out_dir` (atomically).

    Raises LmadaptError (exit code 2), writing nothing, when the method cannot be merged or the
    merged logits differ from the unmerged ones by more than `tolerance`. The merge runs on
    `device`; the reloaded copy is checked on the CPU.
    """
    if tolerance < 0:
        raise LmadaptError(f"tolerance must be >= 0, got {tolerance}")
    out = check_output_dir(
        out_dir, overwrite, "--merge", "--overwrite", "--overwrite", inputs={"RUN": run_dir}
    )
    run = load_run(run_dir, device)
    name = run.config.method.name
    method = build_method(run.config.method)
    if not method.mergeable:
        raise LmadaptError(
            f"method '{name}' cannot be merged into the base weights; only reparameterising "
            "methods (lora, adalora, ia3) can"
        )
    task = run.task
    probe = task.probe_examples if isinstance(task, ProbeableTask) else task.examples_from_texts
    feats = task.encode(probe(PROBE_TEXTS), run.tokenizer)
    batch = task.collator(run.tokenizer)(feats)
    unmerged = _logits(run.model, batch, task)
    model = run.model
    if run.config.quantize != "none":
        # merged into the weights the run trained against: its quantised base, dequantised
        # (a merge into 4/8-bit layers would quantise the sum again, and lose the update)
        where = resolve_device(device)
        base = base_spec(run.config, run.spec, task, where, dequantize=True)
        model = method.load(task, base, RunDir(run_dir).model, run.config.trust_remote_code)
        model.to(where).eval()
    _unwrap_modules_to_save(model)
    merged_model = cast(Mergeable, model).merge_and_unload()
    diff_merged = max_abs_diff(_logits(merged_model, batch, task), unmerged)
    _check(diff_merged, tolerance, "merged")
    with atomic_dir(out) as tmp:
        mark(tmp, "export")
        merged_model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        spec = ModelSpec(run.spec.name, str(tmp), run.spec.kind)
        reloaded = task.build_model(spec, run.config.trust_remote_code)
        diff_reloaded = max_abs_diff(_logits(reloaded, batch, task), unmerged)
        _check(diff_reloaded, tolerance, "merged and reloaded")
        result = {
            "source_run": str(Path(run_dir).resolve()),
            "method": name,
            "model": run.spec.name,
            "max_abs_diff": max(diff_merged, diff_reloaded),
            "tolerance": tolerance,
            "probe_inputs": len(PROBE_TEXTS),
        }
        write_json(tmp / "lmadapt_export.json", result)
    return {"out_dir": str(out), **result}


def _unwrap_modules_to_save(model: torch.nn.Module) -> None:
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


def _check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise LmadaptError(
            f"{what} logits differ from the unmerged model's by {diff:.3g} (tolerance "
            f"{tolerance:g}); nothing was written"
        )
