"""(IA)³ (Liu et al., 2022, arXiv:2205.05638) through peft: learned vectors that rescale keys,
values and the feed-forward activations; the smallest of the reparameterising methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lmadapt.methods.base import PeftMethod
from lmadapt.methods.configs import IA3MethodConfig

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


class IA3(PeftMethod[IA3MethodConfig]):
    """(IA)³ via peft: per-channel scaling of keys, values and FFN inputs; the head trains."""

    mergeable = True
    quantized_base = True

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import IA3Config

        return IA3Config(
            task_type=task_type,
            target_modules=self.cfg.target_modules,
            feedforward_modules=self.cfg.feedforward_modules,
            modules_to_save=task.head_modules(model),
        )
