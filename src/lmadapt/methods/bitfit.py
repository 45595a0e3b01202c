"""BitFit (Ben Zaken et al., 2022, arXiv:2106.10199): train only bias terms, plus the task head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmadapt.methods import METHODS
from lmadapt.methods.base import MethodConfig, WholeModelMethod, unfreeze_modules


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"
    lr: float = 1e-3
    """Biases need a much larger step than full fine-tuning (the paper uses 1e-4 to 1e-3)."""


@METHODS.register("bitfit", BitFitConfig)
class BitFit(WholeModelMethod):
    """BitFit: bias terms and the task head train; everything else is frozen."""

    def apply(self, model: torch.nn.Module, task: Any) -> torch.nn.Module:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name == "bias")
        unfreeze_modules(model, task.head_modules(model))
        return model
