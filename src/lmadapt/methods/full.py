"""Full fine-tuning: every parameter trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmadapt.methods.base import WholeModelMethod

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


class Full(WholeModelMethod):
    """Full fine-tuning: all weights train; saved as a transformers model directory."""

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        model.requires_grad_(True)
        return model
