"""`lmadapt export RUN --format onnx [--quantize int8]`: a directory that ONNX Runtime runs, for
classification, token classification and extractive question answering runs.

The directory (written whole or not at all, like every export):
- `model.onnx`: the run's model, its adapter merged into the base weights. Inputs are the
  features the run's task feeds its model, each int64 of shape (batch, sequence), both axes
  dynamic: `input_ids`, `attention_mask`, and `token_type_ids` where the task's features carry
  them (question answering never does: the run trained on segment 0 throughout, see
  `QuestionAnsweringTask.encode`). Outputs are the model's logits: `logits` (classification
  (batch, labels); token classification (batch, sequence, labels)), or `start_logits` and
  `end_logits` (question answering, (batch, sequence) each).
- the tokenizer files, as `save_pretrained` writes them;
- `lmadapt_task.json`: the task's config and saved state (its labels in the model's output
  order, QA's version and no-answer threshold...), what decoding the logits needs;
- `config.yaml`: the run's resolved config, so that `lmadapt serve` serves the directory as it
  serves the run (`read_export`), decoding with the run's task;
- `lmadapt_export.json`: what was checked and measured; with int8 also a short `report.md`.

fp32 is checked against PyTorch (`ONNX_TOLERANCE`); int8 against the fp32 export, on the run's
dev set (`MAX_METRIC_DROP`). A check that fails writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import torch

from lmadapt.api import LoadedRun, RunInfo, json_object, load_run, read_run, saved_config
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluate.metrics import Evaluation, metric_direction
from lmadapt.export_common import (
    PROBE_TEXTS,
    max_abs_diff,
    merged_model,
    probe_examples,
    task_logits,
)
from lmadapt.inference import Encoded, model_inputs
from lmadapt.io import atomic_dir, write_json, write_text
from lmadapt.methods import build_method
from lmadapt.models import ModelSpec, load_tokenizer
from lmadapt.rundir import CONFIG, RunDir, check_output_dir, mark
from lmadapt.schema import to_dict
from lmadapt.tasks import build_task
from lmadapt.tasks.base import LogitsTask

EXPORT_INFO = "lmadapt_export.json"
TASK_INFO = "lmadapt_task.json"

ONNX_TOLERANCE = 1e-4
"""Largest absolute difference allowed between ONNX Runtime's fp32 logits and the PyTorch run's
on the probe inputs. Measured on this repository's CPU machine: 3.0e-8 (classification),
2.4e-7 (token classification) and 1.2e-7 (question answering) on the tiny test models, 2.1e-7
on MiniLM (`pytest tests/test_export_onnx.py -s`, `-m slow` for MiniLM). 1e-4 leaves room for
other CPUs' kernels and larger models while still catching a wrong graph: on MiniLM, ignoring
the padding mask moves the probe logits by 0.14 and wrong segment ids by 7e-3."""

MAX_METRIC_DROP = 0.5
"""Points (hundredths of a 0-1 score: accuracy, F1, exact match) the int8 model may lose on the
run's dev set against the fp32 export before the export is refused (`--max-metric-drop`).

Why 0.5: dynamic int8 quantisation of a BERT-class encoder is expected to cost a fraction of a
point (on MiniLM here it changed 3 of 200 dev predictions and no accuracy was lost); a larger
loss says that quantisation hurts this model (outlier activations, a small head), which should
be accepted knowingly rather than found in production. Half a point is also about the finest
change a dev set of a few hundred examples shows (one example in 200): a tighter gate would
refuse on a single borderline example. Below 200 dev examples one changed prediction already
exceeds it, so there the refusal asks for a look at the figures, and `--max-metric-drop`
accepts. For a lower-is-better metric (regression's mse) the drop is its rise, times 100."""

QUANTIZE = ("int8",)
"""The `--quantize` values: int8 weights by onnxruntime's dynamic quantisation."""

HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
"""The peft task types whose model is a head over the input tokens: its logits, one forward
pass, are all that decoding reads, so one graph serves the task (a language model's would need a
generation loop around it)."""

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""The model inputs an export takes, in the order of the graph's inputs."""

AXES = {0: "batch", 1: "sequence"}
"""The dynamic axes of every input, by the names they keep in model.onnx."""


def export_onnx(
    run_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    device: str = "auto",
    tolerance: float = ONNX_TOLERANCE,
    quantize: str | None = None,
    max_metric_drop: float = MAX_METRIC_DROP,
) -> dict[str, Any]:
    """Write the run as an ONNX Runtime directory (see the module docstring), checked first.

    Raises LmadaptError (exit code 2), writing nothing, for a method whose weights cannot be
    merged (prompt tuning, bottleneck adapters...), a task that is not a head's logits, fp32
    ONNX Runtime logits further than `tolerance` from the PyTorch run's on the probe inputs, or
    (`quantize="int8"`) a dev metric more than `max_metric_drop` points below the fp32 export's.
    The run loads and merges on `device`; the export and ONNX Runtime run on the CPU.
    Returns what lmadapt_export.json holds, with `out_dir`."""
    if not tolerance >= 0:
        raise ConfigError("--tolerance", f"must be >= 0, got {tolerance}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ConfigError("--quantize", f"must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if not max_metric_drop >= 0:
        raise ConfigError("--max-metric-drop", f"must be >= 0, got {max_metric_drop}")
    out = check_output_dir(
        out_dir, overwrite, "--out", "--overwrite", "--overwrite", inputs={"RUN": run_dir}
    )
    info = read_run(run_dir)
    check_exportable(info)
    _check_installed()
    run = load_run(run_dir, device)
    task = run.task
    feats = task.encode(probe_examples(task), run.tokenizer)
    collate = task.collator(run.tokenizer)
    # the padded batch the graph is traced on, and one unpadded example: another batch size
    # and length, so that the check also shows both axes dynamic
    batch, single = collate(feats), collate(feats[:1])
    reference = [task_logits(run.model, b, task) for b in (batch, single)]
    model = merged_model(run, run_dir, device) if info.method.mergeable else run.model
    model = model.to("cpu").float().eval()
    with atomic_dir(out) as tmp:
        mark(tmp, "export")
        fp32 = tmp / "model.onnx" if quantize is None else tmp / ".fp32" / "model.onnx"
        fp32.parent.mkdir(exist_ok=True)
        graph = export_graph(model, batch, fp32)
        fp32_model = OnnxModel(fp32)
        diff = max(
            max_abs_diff(task_logits(fp32_model, b, task), r)
            for b, r in zip((batch, single), reference)
        )
        if not diff <= tolerance:  # also catches NaN
            raise LmadaptError(
                f"ONNX Runtime's logits differ from the PyTorch run's by {diff:.3g} on the probe "
                f"inputs (tolerance {tolerance:g}); nothing was written"
            )
        result: dict[str, Any] = {
            "source_run": str(Path(run_dir).resolve()),
            "format": "onnx",
            "method": run.config.method.name,
            "model": run.spec.name,
            "model_kind": run.spec.kind,
            "task": task.kind,
            **graph,
            "tolerance": tolerance,
            "max_abs_diff": diff,
            "probe_inputs": len(PROBE_TEXTS),
            "quantize": quantize,
        }
        if quantize == "int8":
            result["int8"] = _quantize_int8(run, fp32, tmp / "model.onnx", max_metric_drop)
            shutil.rmtree(fp32.parent)
            write_text(tmp / "report.md", _report(result))
        result["model_bytes"] = (tmp / "model.onnx").stat().st_size
        run.tokenizer.save_pretrained(tmp)
        shutil.copyfile(RunDir(run_dir).config, tmp / CONFIG)
        write_json(
            tmp / TASK_INFO,
            {"task": to_dict(run.config.task), "state": task.state(), "labels": task.labels},
        )
        write_json(tmp / EXPORT_INFO, result)
    return {"out_dir": str(out), **result}


def check_exportable(info: RunInfo) -> None:
    """Refuse, before any weight loads, a run that one ONNX graph of a plain model cannot hold:
    a method whose trained part cannot be merged into the base weights, or a task whose output
    is not a head's logits."""
    name = info.config.method.name
    if not (info.method.mergeable or info.method.saves_whole_model):
        raise LmadaptError(
            f"method '{name}' cannot be exported to ONNX: the export holds a plain model, and "
            f"{name}'s trained weights cannot be merged into the base weights (lora, adalora "
            "and ia3 merge; full and bitfit runs are plain models already)"
        )
    task = info.task
    if task.peft_task_type not in HEADS or not isinstance(task, LogitsTask):
        raise LmadaptError(
            f"task '{task.kind}' cannot be exported to ONNX: the export covers classification, "
            "token_classification and question_answering runs"
        )


def _check_installed() -> None:
    """Refuse with the install command, not an ImportError, where the onnx extra is missing."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not importlib.util.find_spec(m)]
    if missing:
        raise LmadaptError(f"ONNX export needs {', '.join(missing)}: pip install 'lmadapt[onnx]'")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's and quantiser's notes out of the user's terminal: torch.onnx's on
    operators of packages not installed (torchvision) and on axis names it merges, and
    onnxruntime's advice to pre-process before quantising (its symbolic shape inference fails
    on these graphs, and without it the int8 model came out the same on MiniLM). ONNX
    Runtime logs that advice through the root logger, which would also configure it: a
    handler that drops records stands in while it runs."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level, drop, root = registration.level, logging.NullHandler(), logging.getLogger()
    registration.setLevel(logging.ERROR)
    root.addHandler(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            warnings.filterwarnings(
                "ignore", message=".*script_method", category=DeprecationWarning
            )
            yield
    finally:
        registration.setLevel(level)
        root.removeHandler(drop)


class _Graph(torch.nn.Module):
    """The model as the exported graph sees it: named input tensors in, its logits out, as a
    tuple in `outputs` order (a graph has no ModelOutput)."""

    def __init__(self, model: torch.nn.Module, outputs: list[str]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **segments)
        return tuple(getattr(out, name) for name in self.outputs)


def export_graph(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], path: Path
) -> dict[str, Any]:
    """Write `model` (a plain transformers model, on the CPU in eval mode) to `path` with
    torch.onnx.export, traced on `batch`; returns what the graph is (exporter, opset, inputs,
    outputs, axes) for lmadapt_export.json."""
    import onnx

    given = model_inputs(batch)
    inputs = {name: given[name] for name in INPUTS if name in given}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise LmadaptError(f"the model takes inputs ONNX export does not: {', '.join(unknown)}")
    with torch.no_grad():
        probe = model(**inputs)
    outputs = [name for name in probe if name.endswith("logits")]  # a ModelOutput: its keys
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    large = size > 2**31 - 2**28  # past protobuf's 2 GB, weights go to model.onnx.data
    # dynamo=True, torch.onnx's default exporter since torch 2.9 (the TorchScript exporter,
    # dynamo=False, is deprecated): it captures the graph with torch.export. Axes given as names
    # become Dim.DYNAMIC and keep those names in the written graph.
    try:
        with _quiet():
            torch.onnx.export(
                _Graph(model, outputs).eval(),
                (),
                str(path),
                kwargs=inputs,
                input_names=list(inputs),
                output_names=outputs,
                dynamic_shapes={name: dict(AXES) for name in inputs},
                external_data=large,
                dynamo=True,
                verbose=False,
            )
    except Exception as e:  # an architecture torch.export cannot capture: say which, in a line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LmadaptError(
            f"torch.onnx.export could not export {type(model).__name__}: "
            f"{type(e).__name__}: {first}"
        ) from e
    opset = next(
        (
            o.version
            for o in onnx.load(str(path), load_external_data=False).opset_import
            if o.domain in ("", "ai.onnx")
        ),
        None,
    )
    return {
        "exporter": f"torch.onnx.export (dynamo=True), torch {torch.__version__}",
        "opset": opset,
        "inputs": list(inputs),
        "outputs": outputs,
        "dynamic_axes": list(AXES.values()),
    }


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is a directory `export_onnx` wrote (its lmadapt_export.json says onnx)."""
    info = Path(path) / EXPORT_INFO
    if not info.is_file():
        return False
    try:
        return json_object(info).get("format") == "onnx"
    except DataError:
        return False


def read_export(path: str | Path) -> RunInfo:
    """An ONNX export as its run, for serving: the run's config and task (its saved state: labels
    in the graph's output order, QA's thresholds) and the exported tokenizer; `spec.path` is
    the export directory, whose model.onnx `OnnxModel` runs. Raises LmadaptError naming the
    file that is missing or unusable."""
    path = Path(path)
    for name in (CONFIG, TASK_INFO, "model.onnx"):
        if not (path / name).is_file():
            raise LmadaptError(
                f"{path} is not a complete ONNX export (no {name}); export the run again with "
                "`lmadapt export RUN --format onnx`"
            )
    config = saved_config(path)
    exported, saved = json_object(path / EXPORT_INFO), json_object(path / TASK_INFO)
    try:
        task = build_task(config.task, saved["state"])
        spec = ModelSpec(exported["model"], str(path), exported["model_kind"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(str(path / TASK_INFO), f"unusable task state ({e!r})") from None
    tokenizer = load_tokenizer(spec)
    return RunInfo(path, config, task, spec, build_method(config.method), tokenizer)


class OnnxModel(torch.nn.Module):
    """An ONNX Runtime session over a written model.onnx, called as the task's inference code
    calls a model (a batch of tensors in, an output with the logits by name out), so that the
    task's own evaluation and decoding score the export exactly as they score the run."""

    def __init__(self, path: str | Path):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: not its notes on unused initializers
        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
        """The session's outputs by name, as tensors, for the inputs it takes of `batch`."""
        feed = {name: batch[name].cpu().numpy().astype(np.int64) for name in self.inputs}
        values = self.session.run(self.outputs, feed)
        return SimpleNamespace(**{n: torch.from_numpy(v) for n, v in zip(self.outputs, values)})


# ---------------------------------------------------------------------- int8


def _quantize_int8(
    run: LoadedRun, fp32: Path, int8: Path, max_metric_drop: float
) -> dict[str, Any]:
    """Quantise `fp32` into `int8` and compare the two on the run's dev set (the probe inputs
    where the run has none), int8 scored both in batches and one input at a time; refuses a
    metric drop past `max_metric_drop` points in either."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per-channel int8 weights: each output row its own scale, which keeps a head whose rows
    # differ in range (a classifier's) from losing its small rows to one shared scale
    with _quiet():
        quantize_dynamic(
            fp32,
            int8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=(fp32.parent / "model.onnx.data").exists(),
        )
    task = run.task
    scorer = cast(LogitsTask, task)  # checked by check_exportable
    fp, q = OnnxModel(fp32), OnnxModel(int8)
    probes = run.encoded(probe_examples(task))
    probe_fp, _ = scorer.batch_outputs(fp, probes)
    probe_q, _ = scorer.batch_outputs(q, probes)
    result: dict[str, Any] = {
        "quantization": "onnxruntime quantize_dynamic: int8 weights (QInt8, per channel), "
        "activations quantised per batch at run time",
        "fp32_bytes": fp32.stat().st_size,
        "int8_bytes": int8.stat().st_size,
        "max_abs_diff_vs_fp32": max(
            (float(np.abs(a - b).max()) for a, b in zip(probe_fp, probe_q)), default=0.0
        ),
        "probe_agreement": _agreement(
            scorer.decode(probe_fp, probes.examples), scorer.decode(probe_q, probes.examples)
        ),
        "max_metric_drop": max_metric_drop,
    }
    dev = run.config.data.dev
    if not dev or not Path(dev).is_file():
        result["dev"] = None
        result["note"] = (
            "the run has no dev set (data.dev)"
            if not dev
            else f"the run's dev set {dev} is not there any more"
        ) + ": only the probe inputs' agreement was measured, and no metric was checked"
        return result
    examples = task.check(task.read(dev, run.config.data.format))
    if run.config.data.max_eval_samples:
        examples = examples[: run.config.data.max_eval_samples]
    data = run.encoded(examples)
    (ev_fp, pred_fp), (ev_q, pred_q) = _score(scorer, fp, data), _score(scorer, q, data)
    # int8 activations are quantised per batch (one scale per tensor), so an input's answer
    # depends on its batch: scored again one input at a time, the export's other extreme
    ev_1, pred_1 = _score(scorer, q, dataclasses.replace(data, batch_size=1))
    metric = task.default_metric
    before, batched, alone = ev_fp.metrics[metric], ev_q.metrics[metric], ev_1.metrics[metric]
    sign = 1 if metric_direction(metric) == "max" else -1
    after = min(batched, alone, key=lambda v: sign * v)  # the worse of the two
    drop = 100 * sign * (before - after)
    result["dev"] = {
        "file": str(dev),
        "examples": len(examples),
        "metric": metric,
        "fp32": before,
        "int8": batched,
        "int8_one_at_a_time": alone,
        "drop_points": drop,
        "agreement": _agreement(pred_fp, pred_q),
        "batched_vs_one_at_a_time": _agreement(pred_q, pred_1),
    }
    if not drop <= max_metric_drop:  # also catches NaN
        raise LmadaptError(
            f"int8 {metric} on the dev set ({dev}) is {after:.4f} at worst (batched or one "
            f"input at a time) against fp32's {before:.4f}: "
            f"a drop of {drop:.2f} points, more than --max-metric-drop {max_metric_drop:g}; "
            "nothing was written (export fp32, or pass a larger --max-metric-drop to accept it)"
        )
    return result


def _score(
    task: LogitsTask, model: torch.nn.Module, data: Encoded
) -> tuple[Evaluation, list[dict[str, Any]]]:
    """The task's evaluation and predictions of `model` on labelled `data`, one forward pass."""
    logits, loss = task.batch_outputs(model, data)
    ev = task.evaluate(logits, data.examples)
    if loss is not None:
        ev.metrics["loss"] = loss
    return ev, task.decode(logits, data.examples)


def _predicted(row: dict[str, Any]) -> list[Any] | None:
    """What one prediction row predicts, one item per thing compared: each word's tag (token
    classification), the label or label set (classification), the answer span (QA); None for a
    regression score, which has no label to agree on."""
    if "tags" in row:
        return list(row["tags"])
    if "label" in row:
        return [row["label"]]
    if "answer" in row:
        return [(row["answer"], row["start"], row["end"])]
    return None


def _agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How many predictions (labels, word tags, answers) two models' rows share; None where
    the rows hold scores, not labels."""
    same = total = 0
    for row_a, row_b in zip(a, b):
        pa, pb = _predicted(row_a), _predicted(row_b)
        if pa is None or pb is None:
            return None
        same += sum(x == y for x, y in zip(pa, pb))
        total += len(pa)
    return {"same": same, "compared": total, "rate": same / total if total else 1.0}


def _rate(agreement: dict[str, Any] | None) -> str:
    if agreement is None:
        return "not defined (the predictions are scores)"
    return f"{agreement['same']}/{agreement['compared']} ({100 * agreement['rate']:.1f}%)"


def _report(result: dict[str, Any]) -> str:
    """report.md of an int8 export: the fp32 check, then what int8 costs against it."""
    q = result["int8"]
    lines = [
        "# ONNX export (int8)",
        "",
        f"- run: `{result['source_run']}` ({result['task']}, {result['method']}, "
        f"{result['model']})",
        f"- fp32 check: ONNX Runtime vs PyTorch on {result['probe_inputs']} probe inputs, max "
        f"abs logit difference {result['max_abs_diff']:.2e} (tolerance {result['tolerance']:g})",
        f"- int8: {q['quantization']}",
        f"- model.onnx: {q['fp32_bytes'] / 2**20:.1f} MB fp32 -> "
        f"{q['int8_bytes'] / 2**20:.1f} MB int8",
        f"- probe inputs: int8 agrees with fp32 on {_rate(q['probe_agreement'])}, max abs "
        f"logit difference {q['max_abs_diff_vs_fp32']:.3g}",
        "",
    ]
    dev = q["dev"]
    if dev is None:
        lines.append(f"Not measured on a dev set: {q['note']}.")
        return "\n".join(lines) + "\n"
    lines += [
        f"## Dev set (`{dev['file']}`, {dev['examples']} examples)",
        "",
        "| | fp32 | int8 |",
        "|---|---|---|",
        f"| {dev['metric']} | {dev['fp32']:.4f} | {dev['int8']:.4f} |",
        f"| {dev['metric']}, one input at a time | {dev['fp32']:.4f} | "
        f"{dev['int8_one_at_a_time']:.4f} |",
        "",
        f"Drop: {dev['drop_points']:.2f} points at worst (allowed: {q['max_metric_drop']:g}). "
        f"int8 agrees with fp32 on {_rate(dev['agreement'])} predictions. int8 quantises "
        "activations per batch, so an input's answer depends on its batch: batched and one at "
        f"a time, int8 agrees with itself on {_rate(dev['batched_vs_one_at_a_time'])}.",
    ]
    return "\n".join(lines) + "\n"
