"""lmadapt: adapt pretrained language models to your task (fine-tuning, PEFT, prompting).

The names below load on first use, so importing one part of lmadapt (its errors, a method, the
config) does not import all of it."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_HOME = {
    "ConfigError": "lmadapt.errors",
    "DataError": "lmadapt.errors",
    "LmadaptError": "lmadapt.errors",
    "RunConfig": "lmadapt.config",
    "load_config": "lmadapt.config",
    "evaluate": "lmadapt.api",
    "load_run": "lmadapt.api",
    "predict": "lmadapt.api",
    "robustness": "lmadapt.api",
    "train": "lmadapt.api",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'lmadapt' has no attribute {name!r}")
