"""Will the run fit? A memory estimate made before the model is loaded, printed, and a refusal
that names the settings that would fit when it cannot.

estimate = weights + trainable state + activations, where

- weights: every frozen parameter in the dtype it loads in (the config's, else fp32; bf16 for
  those `train.base_dtype` holds in bf16), counted on
  a meta-device copy of the task's model built from the config alone (`models.shapes_only`), so
  a 7B model is sized without a byte of it allocated;
- trainable state: each trainable parameter as an fp32 weight, its gradient and AdamW's two
  moments (16 bytes);
- activations: what the backward pass keeps, traced: the run's largest batch goes through the
  task's own step on that meta-device model (`lmadapt.activations`), which counts every tensor
  autograd saves, plus the backward's working set. Where the trace cannot run (an op with no meta
  kernel in some remote code), they are modelled after Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), §4.1:
  s·b·h·(34 + 5·a·s/h) bytes per layer with 16-bit activations (s tokens, b rows, h width, a
  heads; the 5·a·s/h part is the attention score matrices, kept only by eager attention), taken
  as fp32; gradient checkpointing keeps each layer's input plus one layer's full set, and a
  language-model head adds its fp32 logits, their log-softmax and both gradients.
  A task whose example is several rows (`PairedTask`: a preference pair's two replies) has b
  count rows, and a frozen reference copy of the model counts among the weights.

On the CPU the printed peak adds what the process already holds. Against measured peak RSS over
tasks, methods, checkpointing and quantisation: bench/results/memory_estimate.md
(`python -m bench.memory_estimate`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch

from lmadapt.activations import Saved, trace_step
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.inference import autocast_bf16, bf16_castable, frozen_base_dtype
from lmadapt.methods import METHODS, build_method
from lmadapt.methods.base import count_parameters
from lmadapt.models import ModelSpec, Quantized, shapes_only
from lmadapt.schema import parse_section
from lmadapt.session import apply_method, set_attention
from lmadapt.train.config import TrainConfig
from lmadapt.train.int8_base import int8_linears
from lmadapt.train.loop import BatchPreparingTask

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from transformers import PreTrainedModel

    from lmadapt.tasks.base import Task

GIB = 2**30
ADAMW_STATE_BYTES = 16
"""fp32 weight + gradient + two AdamW moments, per trainable parameter."""
ACT_BYTES = 4
"""Activations counted as fp32 (bf16 autocast keeps some in 16 bits: the estimate errs high)."""


@runtime_checkable
class PairedTask(Protocol):
    """A task whose training example puts several rows in a batch and whose loss may need a
    second, frozen copy of the model (preference: a pair's two replies; its reference model)."""

    rows_per_example: int

    def reference_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of the frozen copy training holds beside `model` (adapted), 0 for none."""


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model and a method, read on the meta device."""

    frozen_bytes: int
    trainable: int
    total: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    """Width of the language-model head's logits; 0 when the task's model has none."""
    rows_per_example: int = 1
    """Batch rows per training example (2 for a preference pair)."""
    saved: Saved | None = None
    """What the run's largest batch keeps for backward, traced (`lmadapt.activations`); None
    where no batch was given or the trace failed: the activations are then modelled."""


@dataclass(frozen=True)
class Step:
    """The training step to trace: its largest batch (on the host) and the run's settings."""

    batch: dict[str, torch.Tensor]
    train: TrainConfig
    attention: str
    bf16: bool
    host: bool = False
    """The step runs on the CPU (its allocator's retention counts)."""


@dataclass(frozen=True)
class Estimate:
    weights: int
    trainable_state: int
    activations: int
    shape: Shape
    batch: int
    length: int
    checkpointing: bool
    held: int = 0
    """What the process holds before the model loads (Python, torch, the data): on the CPU the
    run's peak RSS counts it too, and the host's free memory already leaves it out."""
    loading: int = 0
    """Quantising on the CPU: transformers reads every weight from the memory-mapped
    safetensors files, whose pages count in RSS while the model is built (the quantised layers
    grow beside them), so the load can peak above training. Their pages are cache the kernel
    may drop: this counts toward the peak RSS, not toward what must fit."""

    @property
    def total(self) -> int:
        """What the run adds to the process (compared with free memory)."""
        return self.weights + self.trainable_state + self.activations

    @property
    def peak(self) -> int:
        """The peak memory of the process (on the CPU: its peak RSS)."""
        return max(self.total, self.loading + self.weights) + self.held

    def describe(self) -> str:
        return (
            f"about {self.total / GIB:.1f} GiB (frozen weights {self.weights / GIB:.1f}, trainable "
            f"state {self.trainable_state / GIB:.1f} for {self.shape.trainable:,} trainable of "
            f"{self.shape.total:,} parameters, activations {self.activations / GIB:.1f} at batch "
            f"{self.batch} x {self.length} tokens"
            + (", checkpointed" if self.checkpointing else "")
            + ")"
        )


def model_shape(
    spec: ModelSpec,
    task: Task,
    method: Any,
    trust_remote_code: bool,
    base_dtype: str = "fp32",
    step: Step | None = None,
) -> Shape:
    """Parameter counts and layer sizes of the task's model under `method`, built on the meta
    device from the config (no weights read, nothing allocated). `base_dtype`
    (`frozen_base_dtype`): the frozen weights a bf16 base casts count 2 bytes each; an int8 base
    adds 2 bytes a frozen linear weight (its two packed int8 copies) to the fp32 ones it keeps.
    With a `step`, the model is set up as the run sets it up (attention kernel, dropout) and the
    step traced on it."""
    with shapes_only(), torch.device("meta"):
        base = task.build_model(spec, trust_remote_code)
        cfg = base.config
        head = (
            cast("PreTrainedModel", base).get_output_embeddings()
            if hasattr(base, "get_output_embeddings")
            else None
        )
        if step is None:
            model = method.apply(base, task)
        else:  # checkpointing is counted from the untouched trace (`Saved.kept`)
            set_attention(base, step.attention, spec.kind)
            train = dataclasses.replace(step.train, gradient_checkpointing=False)
            model = apply_method(base, method, task, train)
    trainable, total = count_parameters(model)
    paired = task if isinstance(task, PairedTask) else None
    in_bf16 = {id(p) for p in bf16_castable(model)} if base_dtype == "bf16" else set()
    saved = _trace(model, task, step, in_bf16) if step is not None else None
    packed = quantized_bytes(base, spec.quantized) if spec.quantized else {}
    seen: set[int] = set()
    frozen_bytes = 0
    for p in model.parameters():
        if id(p) not in seen and not p.requires_grad:
            seen.add(id(p))
            size = p.numel() * (2 if id(p) in in_bf16 else p.element_size())
            frozen_bytes += int(packed.get(id(p), size))
    if base_dtype == "int8":
        frozen_bytes += sum(2 * m.weight.numel() for m in int8_linears(model))
    if paired is not None:
        frozen_bytes += paired.reference_bytes(model)
    return Shape(
        frozen_bytes=frozen_bytes,
        trainable=trainable,
        total=total,
        layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
        hidden=int(getattr(cfg, "hidden_size", 0) or 0),
        heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
        vocab=int(getattr(cfg, "vocab_size", 0) or 0) if head is not None else 0,
        rows_per_example=paired.rows_per_example if paired is not None else 1,
        saved=saved,
    )


def _trace(model: torch.nn.Module, task: Task, step: Step, in_bf16: set[int]) -> Saved | None:
    """`step` traced on the meta `model` with the frozen weights in the dtype they train in; on
    a copy of the task, so that what its step caches (preference's frozen reference model)
    stays out of the real run, and in the meta context, so that a model the step builds is
    shapes only too. None where the trace cannot run: the formula stands in."""
    for p in model.parameters():
        if id(p) in in_bf16:
            p.data = p.data.to(torch.bfloat16)
    probe = copy.copy(task)
    prepare = probe.prepare_batch if isinstance(probe, BatchPreparingTask) else None
    try:
        with shapes_only(), torch.device("meta"):
            return trace_step(model, probe, step.batch, step.bf16, prepare, step.host)
    except Exception:  # an op with no meta kernel (some remote code)
        return None


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Per weight of an NF4 layer: 4 bits, an 8-bit scale per block of 64, and (double
quantisation) an fp32 scale per 256 of those (Dettmers et al. 2023, section 3)."""


def quantized_bytes(base: torch.nn.Module, q: Quantized) -> dict[int, float]:
    """Bytes each weight that bitsandbytes will quantise takes once it has, by parameter id:
    the weights of the linear layers transformers converts (all but `q.keep`)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    out: dict[int, float] = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and should_convert_module(name, list(q.keep)):
            w = module.weight
            # int8: a byte per weight and an fp32 scale per output row (LLM.int8())
            out[id(w)] = w.numel() * NF4_BYTES if q.bits == "nf4" else w.numel() + 4 * w.shape[0]
    return out


def activation_bytes(
    shape: Shape, batch: int, length: int, checkpointing: bool, eager_attention: bool
) -> int:
    """Activations the backward pass keeps: traced where the shape has its step's trace, else
    modelled (the module docstring gives the formula's source)."""
    if shape.saved is not None:
        return shape.saved.kept(batch * shape.rows_per_example, checkpointing)
    tokens = batch * shape.rows_per_example * length
    scores = 5 * shape.heads * length / shape.hidden if eager_attention and shape.hidden else 0
    per_layer = tokens * shape.hidden * (34 + scores) * ACT_BYTES / 2
    if checkpointing:
        kept = shape.layers * tokens * shape.hidden * ACT_BYTES + per_layer
    else:
        kept = shape.layers * per_layer
    logits = 4 * tokens * shape.vocab * ACT_BYTES
    return int(kept + logits)


def estimate(
    shape: Shape, batch: int, length: int, checkpointing: bool, eager_attention: bool
) -> Estimate:
    return Estimate(
        weights=shape.frozen_bytes,
        trainable_state=shape.trainable * ADAMW_STATE_BYTES,
        activations=activation_bytes(shape, batch, length, checkpointing, eager_attention),
        shape=shape,
        batch=batch,
        length=length,
        checkpointing=checkpointing,
    )


def free_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory where the run trains: the GPU's, else the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} ({torch.cuda.get_device_name(device)})"
    import psutil

    return psutil.virtual_memory().available, "this machine's RAM"


def _largest_batch(fits: Any, batch: int) -> int | None:
    """The largest of batch, batch/2, ..., 1 for which `fits(b)`; None when even 1 does not."""
    b = batch
    while b >= 1:
        if fits(b):
            return b
        b = b // 2 if b > 1 else 0
    return None


def what_fits(
    current: Estimate,
    peft: Shape | None,
    free: int,
    grad_accum: int,
    eager_attention: bool,
) -> list[str]:
    """Settings that bring the run under `free`, each with as few changes as it takes: a smaller
    batch, gradient checkpointing, a PEFT method (LoRA) in place of full fine-tuning."""
    options: list[str] = []
    candidates = [(current.shape, "", False), (current.shape, "", True)]
    if peft is not None:
        candidates += [(peft, "method.name=lora", False), (peft, "method.name=lora", True)]
    for shape, method, ckpt in candidates:
        ckpt = ckpt or current.checkpointing

        def fits(b: int, shape: Shape = shape, ckpt: bool = ckpt) -> bool:
            return estimate(shape, b, current.length, ckpt, eager_attention).total <= free

        b = _largest_batch(fits, current.batch)
        if b is None:
            continue
        parts = [method] if method else []
        if ckpt and not current.checkpointing:
            parts.append("train.gradient_checkpointing=true")
        if b != current.batch:
            accum = grad_accum * math.ceil(current.batch / b)
            parts.append(f"train.batch_size={b} with train.grad_accum={accum}")
        option = " + ".join(parts)
        if option and not any(option.startswith(o) for o in options):
            options.append(option)
    return options


def check_fits(
    config: Any,
    spec: ModelSpec,
    task: Task,
    method: Any,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    report: bool = True,
) -> Estimate | None:
    """Estimate the run's memory before loading the model, print it (when `report`), and refuse
    with the settings that would fit when the estimate exceeds the device's free memory. A model
    that cannot be built on the meta device (some remote code) is not refused for that: the
    check is a guard, not a gate, so the run goes on unchecked and says so."""
    eager = config.attention == "eager" or (config.attention == "auto" and spec.kind == "encoder")
    t = config.train
    bf16 = autocast_bf16(t.precision, device)
    base_dtype = frozen_base_dtype(t.base_dtype, bf16, device, t.distributed)
    step = Step(batch, t, config.attention, bf16, host=device.type == "cpu")
    longest = int(batch["input_ids"].shape[1])
    try:
        shape = model_shape(spec, task, method, config.trust_remote_code, base_dtype, step)
    except LmadaptError:
        raise
    except Exception as e:  # any failure of the meta build only skips the check
        if report:
            why = (str(e).splitlines() or [""])[0]
            print(
                f"lmadapt: memory: no estimate ({type(e).__name__}: {why}); not checked",
                file=sys.stderr,
                flush=True,
            )
        return None
    need = estimate(
        shape, config.train.batch_size, longest, config.train.gradient_checkpointing, eager
    )
    if device.type == "cpu":
        import psutil

        mapped = (
            sum(f.stat().st_size for f in Path(spec.path).glob("*.safetensors"))
            if spec.quantized
            else 0
        )
        need = dataclasses.replace(need, held=psutil.Process().memory_info().rss, loading=mapped)
    free, where = free_bytes(device)
    if report:
        peak = f"; peak RSS about {need.peak / GIB:.2f} GiB" if need.held else ""
        print(
            f"lmadapt: memory: this run needs {need.describe()}; {where} has "
            f"{free / GIB:.1f} GiB free{peak}",
            file=sys.stderr,
            flush=True,
        )
    if need.total <= free:
        return need
    peft = None
    if shape.trainable > shape.total // 10:  # (nearly) every weight trains: full fine-tuning
        lora = build_method(parse_section(METHODS, "name", "lora", "method"))
        peft = model_shape(spec, task, lora, config.trust_remote_code, base_dtype, step)
    options = what_fits(need, peft, free, config.train.grad_accum, eager)
    if options:
        hint = "would fit: " + "; or ".join(options)
    else:
        weights = (peft or shape).frozen_bytes  # under LoRA (nearly) every weight is frozen
        hint = (
            "no smaller batch, gradient checkpointing or PEFT method fits (the weights alone "
            f"take {weights / GIB:.1f} GiB); use a smaller model or a machine with more memory"
        )
    raise ConfigError(
        "model",
        f"{spec.name} will not fit: this run needs about {need.total / GIB:.1f} GiB but {where} "
        f"has {free / GIB:.1f} GiB free; {hint}",
    )
