"""One run's set-up, written once for every command that computes (train, continual, distill,
prompt, generate, evaluate, hpo and compare through train): torch threads and seeds, the
attention kernel, the run directory's life (created marked, removed if the run fails before it
can be resumed, a failed write reported in one line) and run.json.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmadapt.errors import LmadaptError
from lmadapt.models import ModelSpec
from lmadapt.rundir import create_output_dir
from lmadapt.train.checkpoint import latest_checkpoint


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_attention(model: torch.nn.Module, choice: str, kind: str) -> None:
    """Pick the attention kernel; measured in bench/: eager is faster for encoder fine-tuning."""
    impl = {"auto": "eager" if kind == "encoder" else None}.get(choice, choice)
    if impl and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)


@contextlib.contextmanager
def run_directory(out: Path, command: str, create: bool = True) -> Iterator[Path]:
    """The run directory for the body's writes: created (marked as lmadapt's) when `create`,
    else reused as it is (a resumed run). If the body fails and the run has no checkpoint to
    resume from, a directory created here is removed, so nothing half-written stays; a failed
    write (disk full, permissions) becomes one line that says what survived."""
    if create:
        create_output_dir(out, command)

    def resumable() -> bool:
        return latest_checkpoint(out / "checkpoints") is not None

    try:
        yield out
    except OSError as e:
        if create and not resumable():
            shutil.rmtree(out, ignore_errors=True)
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        if resumable():
            hint = f"free space (or fix the cause), then resume with: lmadapt train --resume {out}"
        else:
            hint = "no checkpoint had been saved, so the run directory was removed"
        raise LmadaptError(f"could not write the run ({what}); {hint}") from None
    except BaseException:
        if create and not resumable():
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_info(method: str, spec: ModelSpec, task: Any) -> dict[str, Any]:
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
