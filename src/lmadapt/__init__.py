"""lmadapt: adapt pretrained language models to your task (fine-tuning, PEFT, prompting).

The names below load on first use, so importing one part of lmadapt (its errors, a method, the
config) does not import all of it."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Any

__version__ = "0.1.0"
# bitsandbytes (imported by peft and transformers whenever it is installed) warns on import that
# its optional AVX512-BF16 CPU kernel cannot be fetched; lmadapt turns that kernel off
# (models.load_model), so the warning would only be noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
_HOME = {
    "ConfigError": "lmadapt.errors",
    "DataError": "lmadapt.errors",
    "LmadaptError": "lmadapt.errors",
    "RunConfig": "lmadapt.config",
    "load_config": "lmadapt.config",
    # one API function per CLI command (cli.API), plus what they share
    "train": "lmadapt.api",
    "resume": "lmadapt.api",
    "evaluate": "lmadapt.api",
    "predict": "lmadapt.api",
    "predictions": "lmadapt.api",
    "load_run": "lmadapt.api",
    "methods": "lmadapt.api",
    "models": "lmadapt.api",
    "serve": "lmadapt.serve",
    "compare": "lmadapt.compare",
    "hpo": "lmadapt.hpo",
    "export_merged": "lmadapt.export",
    "export_run": "lmadapt.export",
    "run_continual": "lmadapt.continual",
    "run_distill": "lmadapt.distill",
    "generate": "lmadapt.generate",
    "chat": "lmadapt.generate",
    "evaluate_base": "lmadapt.generate",
    "run_prompt": "lmadapt.prompting.runner",
    "robustness": "lmadapt.api",
    "explain": "lmadapt.api",
    "ui": "lmadapt.ui",
    "auto": "lmadapt.auto",
}
__all__ = sorted(_HOME)


class _Package(types.ModuleType):
    """The package whose API names always mean the functions: `lmadapt.train` is the train
    function even after the `lmadapt.train` subpackage is imported (importing a submodule sets
    the same-named attribute on its parent, which would otherwise replace the function after its
    first use). Submodules are imported by their dotted names (`from lmadapt.train import loop`)."""

    def __getattribute__(self, name: str) -> Any:
        if name in _HOME:
            return getattr(importlib.import_module(_HOME[name]), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
