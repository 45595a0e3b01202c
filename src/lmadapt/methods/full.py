"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmadapt.methods import METHODS
from lmadapt.methods.base import MethodConfig, WholeModelMethod

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"
    lr: float = 5e-5
    """Every weight moves, so the step is small: the BERT and RoBERTa papers fine-tune at 1e-5
    to 5e-5."""


@METHODS.register("full", FullConfig)
class Full(WholeModelMethod):
    """Full fine-tuning: all weights train; saved as a transformers model directory."""

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
