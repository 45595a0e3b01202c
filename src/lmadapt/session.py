"""One run's set-up, written once for every command that computes (train, continual, distill,
prompt, generate, evaluate, hpo and compare through train): torch threads and seeds, the
device, the attention kernel, the run directory's life (created marked, removed if the run fails
before it can be resumed, a failed write reported in one line) and run.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import random
import re
import resource
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch

from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.models import ModelSpec, Quantized, as_safetensors, shapes_only
from lmadapt.rundir import RunDir, create_output_dir
from lmadapt.train.checkpoint import latest_checkpoint
from lmadapt.train.config import TrainConfig
from lmadapt.train.loop import chosen_dropout, set_dropout

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from transformers import PreTrainedModel

    from lmadapt.methods.base import Method
    from lmadapt.tasks.base import Task


def set_threads(n: int | None = None) -> None:
    """torch intra-op threads: `n`, or every core of the machine."""
    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(threads: int | None, seed: int) -> None:
    """What a command does before reading data or building a model."""
    set_threads(threads)
    seed_everything(seed)


def resolve_device(choice: str) -> torch.device:
    """The torch device for the `device` setting, refused in one line when this machine lacks it,
    so a user asking for a GPU never trains on the CPU without being told."""
    if choice == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not torch.backends.mps.is_available():
            why = "MPS (Apple GPU) is not available on this machine"
            raise ConfigError("device", f"{why}; use device: cpu or auto")
        return torch.device("mps")
    device = torch.device(choice)  # cuda or cuda:N (the config checked the spelling)
    if not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} built without CUDA"
            if torch.version.cuda is None
            else "no GPU visible"
        )
        raise ConfigError(
            "device",
            f"CUDA is not available on this machine ({why}); use device: cpu or auto",
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            "device",
            f"{choice} asked for, but this machine has {count} CUDA GPU(s) "
            f"(cuda:0 to cuda:{count - 1})",
        )
    return device


def peak_rss_mb() -> float:
    """This process's peak RSS: Linux's VmHWM where there is one, since ru_maxrss keeps the
    parent's RSS at fork and exec (a run started by a 4 GB process reported 4 GB)."""
    with contextlib.suppress(OSError):
        status = Path("/proc/self/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def set_attention(model: torch.nn.Module, choice: str, kind: str) -> None:
    """Pick the attention kernel; measured in bench/: eager is faster for encoder fine-tuning."""
    impl = {"auto": "eager" if kind == "encoder" else None}.get(choice, choice)
    if impl and hasattr(model, "set_attn_implementation"):
        cast("PreTrainedModel", model).set_attn_implementation(impl)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint every transformer block, non-reentrant: the reentrant variant loses gradients
    when a block's inputs do not require them (a frozen base under a PEFT method)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            "train.gradient_checkpointing",
            f"{type(model).__name__} does not support gradient checkpointing; set it to false",
        )
    kwargs = {"use_reentrant": False}
    hf_model = cast("PreTrainedModel", model)  # a transformers model: it supports checkpointing
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def check_quantize(choice: str, method: Any) -> None:
    """Refuse a 4/8-bit base (`quantize`) where it cannot train, in one line naming the field:
    a method that trains the base's own weights (they would be quantised), or no bitsandbytes."""
    if choice == "none":
        return
    if not method.quantized_base:
        raise ConfigError(
            "quantize",
            f"{choice} weights cannot change, and method {method.cfg.name} as configured trains "
            "or rewrites the base's own weights (full, bitfit, PiSSA/OLoRA init) or its inputs "
            "(prompt methods); use lora, adalora or ia3, or quantize: none",
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "quantize",
            f"{choice} needs bitsandbytes, which is not installed "
            "(pip install 'lmadapt[quantize]'); use quantize: none",
        )


def quantized_spec(
    spec: ModelSpec,
    task: Task,
    choice: Literal["none", "nf4", "int8"],
    device: torch.device,
    bf16: bool = False,
    trust_remote_code: bool = False,
    dequantize: bool = False,
) -> ModelSpec:
    """`spec`, loading its base quantised as `choice` on `device` (`quantize: none`: unchanged).

    The task's head stays in full precision, and so do the modules transformers never quantises
    (the LM head): both are read from a meta-device copy of the task's model, since a skip list
    given to transformers replaces its own. Computes in bf16 where the run autocasts to it on a
    GPU; on a CPU in fp32 (bitsandbytes' CPU kernels dequantise to the compute dtype)."""
    if choice == "none":
        return spec
    spec = as_safetensors(spec)  # transformers quantises only from safetensors
    from transformers.quantizers.base import get_keys_to_not_convert

    with shapes_only(), torch.device("meta"):
        meta = task.build_model(spec, trust_remote_code)
    heads = set(task.head_modules(meta))
    # transformers matches a skip entry from the start of a name or as its suffix: give it the
    # full name of every linear layer under a head module (BERT's "pooler" holds "pooler.dense")
    under_heads = {
        name
        for name, module in meta.named_modules()
        if isinstance(module, torch.nn.Linear) and not heads.isdisjoint(name.split("."))
    }
    keep = tuple(sorted(under_heads | set(get_keys_to_not_convert(meta))))
    compute: Literal["float32", "bfloat16"] = (
        "bfloat16" if bf16 and device.type == "cuda" else "float32"
    )
    where = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
    return dataclasses.replace(spec, quantized=Quantized(choice, keep, where, compute, dequantize))


def _embeddings_frozen(model: torch.nn.Module) -> bool:
    if not hasattr(model, "get_input_embeddings"):  # not a transformers model
        return False
    embeddings = cast("PreTrainedModel", model).get_input_embeddings()
    return embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())


def apply_method(
    base: torch.nn.Module, method: Method, task: Task, train: TrainConfig
) -> torch.nn.Module:
    """`method` applied to `base`, checkpointing set on the base first when asked: every command
    that trains builds its model here, so each gets the same memory and dropout settings. The
    method's base dropout (none in a frozen base) is set before the method adds its own layers,
    whose dropout is the method's setting; `train.dropout` or the task's choice, when given,
    replaces every dropout in the loop instead. A PEFT method freezes the embeddings, so their
    output is made to require grads (checkpointed blocks then always have an input to send
    gradients through)."""
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    if chosen_dropout(train, task) is None and method.base_dropout is not None:
        set_dropout(base, method.base_dropout)
    model = method.apply(base, task)
    if (
        train.gradient_checkpointing
        and _embeddings_frozen(base)
        and not getattr(base, "_require_grads_hooks", None)  # transformers may have done it
    ):
        cast("PreTrainedModel", base).enable_input_require_grads()
    return model


@contextlib.contextmanager
def run_directory(
    out: Path, command: str, create: bool = True, keep: Callable[[], bool] | None = None
) -> Iterator[Path]:
    """The run directory for the body's writes: created (marked as lmadapt's) when `create`,
    else reused as it is (a resumed run). If the body fails and nothing in it is worth keeping
    (`keep`, by default: a finished run, or a checkpoint to resume from), a directory created
    here is removed, so nothing half-written stays; a failed write (disk full, permissions)
    becomes one line that says what survived. Creating is inside the guard too: Ctrl-C between
    the directory's creation and its marker leaves nothing."""

    def resumable() -> bool:
        return latest_checkpoint(RunDir(out).checkpoints) is not None

    def finished() -> bool:
        return RunDir(out).finished()

    kept = keep or (lambda: finished() or resumable())
    try:
        if create:
            create_output_dir(out, command)
        yield out
    except OSError as e:
        if create and not kept():
            shutil.rmtree(out, ignore_errors=True)
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        if keep is not None:
            hint = f"what had finished is kept in {out}" if kept() else f"{out} was removed"
        elif finished():
            hint = f"the run had finished and is kept in {out}"
        elif resumable():
            hint = f"free space (or fix the cause), then resume with: lmadapt train --resume {out}"
        else:
            hint = "no checkpoint had been saved, so the run directory was removed"
        raise LmadaptError(f"could not write the run ({what}); {hint}") from None
    except BaseException:
        if create and not kept():
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_info(method: str, spec: ModelSpec, task: Task) -> dict[str, Any]:
    """run.json: what a saved run needs besides its config (label set, base model)."""
    return {
        "lmadapt_run": 1,
        "model": {
            "name": spec.name,
            "path": spec.path,
            "gguf_file": spec.gguf_file,
            "kind": spec.kind,
        },
        "method": method,
        "task": task.state(),
    }
