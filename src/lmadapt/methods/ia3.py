"""(IA)³ (Liu et al., 2022, arXiv:2205.05638) through peft: learned vectors that rescale keys,
values and the feed-forward activations; the smallest of the reparameterising methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.errors import ConfigError
from lmadapt.methods import METHODS
from lmadapt.methods.base import MethodConfig, PeftMethod

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


@dataclass
class IA3MethodConfig(MethodConfig):
    name: str = "ia3"
    lr: float = 1e-2
    """Scaling vectors start at 1 and need large steps to move (the paper uses 3e-3 on T0-3B; on
    MiniLM / SST-2, 1e-2 gave 0.75 dev accuracy after 40 steps, 3e-3 gave 0.70)."""
    target_modules: list[str] | None = None
    """Modules whose output (or input, for feed-forward ones) is rescaled; None = peft's default
    for the architecture (key, value, output.dense for BERT; k_proj, v_proj, down_proj for
    Llama)."""
    feedforward_modules: list[str] | None = None
    """The subset of target_modules rescaled on their input rather than output; None = peft's
    default (output.dense for BERT, down_proj for Llama). Needs target_modules."""

    def __post_init__(self) -> None:
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ConfigError(
                "method.feedforward_modules", "needs method.target_modules (it must be a subset)"
            )
        if self.feedforward_modules and not set(self.feedforward_modules) <= set(
            self.target_modules or []
        ):
            raise ConfigError(
                "method.feedforward_modules",
                f"must be a subset of target_modules {self.target_modules}, "
                f"got {self.feedforward_modules}",
            )


@METHODS.register("ia3", IA3MethodConfig)
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
