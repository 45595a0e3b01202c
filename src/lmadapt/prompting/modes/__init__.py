"""Prompting modes: each turns a PromptConfig into an Outcome (metrics, prediction rows,
report sections, plots) that `run_prompt` writes the same way. One file per mode family, each
mode registered with one `@MODES.register(...)` line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmadapt.registry import Registry

MODES: Registry = Registry("prompt mode")


@dataclass
class Outcome:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    sections: list[str]
    images: list[Path] = field(default_factory=list)


def mean_sd(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def plus_minus(s: dict[str, float]) -> str:
    return f"{s['mean']:.4f} ± {s['sd']:.4f}"


from lmadapt.prompting.modes import classify, generate  # noqa: E402,F401  (register themselves)
