"""Export a trained run: as a plain transformers model directory with the adapter merged in
(`export_merged`, format safetensors), or in another format (`FORMATS`: ONNX, GGUF), each
through `export_run`.

Merging folds a reparameterising adapter (LoRA, AdaLoRA, IA3) into the base weights, so the
exported model needs neither peft nor lmadapt and runs at the base model's speed. Merging
changes floating-point rounding, so the export is checked: the merged model, reloaded from the
written files, must give the same logits as the unmerged one on a few inputs, or nothing is
written. Every format checks itself likewise before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.api import load_run
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.export_common import (
    PROBE_TEXTS,
    max_abs_diff,
    merged_model,
    probe_batch,
    task_logits,
)
from lmadapt.io import atomic_dir, write_json
from lmadapt.methods import build_method
from lmadapt.models import ModelSpec
from lmadapt.rundir import check_output_dir, mark

__all__ = ["FORMATS", "Format", "export_merged", "export_run"]


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
        out_dir, overwrite, "--out", "--overwrite", "--overwrite", inputs={"RUN": run_dir}
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
    batch = probe_batch(task, run.tokenizer)
    unmerged = task_logits(run.model, batch, task)
    merged = merged_model(run, run_dir, device)
    diff_merged = max_abs_diff(task_logits(merged, batch, task), unmerged)
    _check(diff_merged, tolerance, "merged")
    with atomic_dir(out) as tmp:
        mark(tmp, "export")
        merged.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
        spec = ModelSpec(run.spec.name, str(tmp), run.spec.kind)
        reloaded = task.build_model(spec, run.config.trust_remote_code)
        diff_reloaded = max_abs_diff(task_logits(reloaded, batch, task), unmerged)
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


def _check(diff: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise LmadaptError(
            f"{what} logits differ from the unmerged model's by {diff:.3g} (tolerance "
            f"{tolerance:g}); nothing was written"
        )


# ---------------------------------------------------------------------- formats

Exporter = Callable[..., dict[str, Any]]
"""A format's export function: `(run_dir, out_dir, *, overwrite, device, **options) -> result`,
writing `out_dir` atomically and raising LmadaptError (nothing written) when it refuses."""


@dataclass(frozen=True)
class Format:
    """One export format. Its exporter is imported on first use, so that exporting one format
    loads none of the others' libraries (onnx, onnxruntime, a GGUF writer)."""

    load: Callable[[], Exporter]
    options: tuple[str, ...]
    """The keyword options it takes beyond run, output directory, overwrite and device."""
    about: str


def _safetensors() -> Exporter:
    return export_merged


def _onnx() -> Exporter:
    from lmadapt.export_onnx import export_onnx

    return export_onnx


def _gguf() -> Exporter:
    from lmadapt.export_gguf import export_gguf

    return export_gguf


FORMATS: dict[str, Format] = {
    "safetensors": Format(
        _safetensors, ("tolerance",), "a transformers model directory, the adapter merged in"
    ),
    "onnx": Format(
        _onnx,
        ("tolerance", "quantize", "max_metric_drop"),
        "model.onnx for ONNX Runtime (classification, token classification, question "
        "answering), fp32 or int8",
    ),
    "gguf": Format(_gguf, (), "a GGUF file"),
}
"""Format name (`lmadapt export --format`) -> its exporter and options."""


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str = "safetensors",
    overwrite: bool = False,
    device: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Export a finished run in format `fmt` (a name in FORMATS) to `out_dir`.

    The one entry point of `lmadapt export`, so that every format is chosen, and an option it
    does not take refused, in one place, before anything loads. `options` are the format's own
    (`Format.options`); an option given as None takes the format's default. Returns the
    format's result (`out_dir` and what its check measured)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in FORMATS[fmt].options:
            raise ConfigError(f"--{key.replace('_', '-')}", f"does not apply to --format {fmt}")
    return FORMATS[fmt].load()(run_dir, out_dir, overwrite=overwrite, device=device, **given)
