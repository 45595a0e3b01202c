"""LoRA (Hu et al., 2021, arXiv:2106.09685) through peft: W + (alpha/r)·B·A on target linears."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.errors import ConfigError
from lmadapt.methods import METHODS
from lmadapt.methods.base import MethodConfig, PeftMethod

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


def check_lora_shape(section: str, r: int, dropout: float) -> None:
    """LoRA's rank and dropout checks, shared with the continual `adapters` strategy."""
    if r < 1:
        raise ConfigError(f"{section}.r", f"must be >= 1, got {r}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"{section}.dropout", f"must be in [0, 1), got {dropout}")


@dataclass(kw_only=True)
class LowRankShape:
    """What every LoRA-style adapter shares (lora, adalora, continual's `adapters` strategy): the
    scale, the dropout on the adapter's input and which modules are adapted. Keyword-only, so it
    mixes into configs whose `name` has no default."""

    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank."""
    dropout: float = 0.1
    target_modules: list[str] | None = None
    """Module names to adapt; None = peft's default for the architecture (query/value for BERT,
    q_proj/v_proj for Llama); ["all-linear"] adapts every linear layer but the head."""


@dataclass
class LoraMethodConfig(LowRankShape, MethodConfig):
    name: str = "lora"
    lr: float = 5e-4
    r: int = 8

    def __post_init__(self) -> None:
        check_lora_shape("method", self.r, self.dropout)


@METHODS.register("lora", LoraMethodConfig)
class Lora(PeftMethod[LoraMethodConfig]):
    """LoRA via peft: low-rank updates on attention projections; the head trains fully."""

    mergeable = True
    quantized_base = True

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import LoraConfig

        target: Any = self.cfg.target_modules
        heads = task.head_modules(model)
        exclude = None
        if target == ["all-linear"]:
            # peft leaves out the heads it knows by name (classifier, score); the task's own
            # (question answering's qa_outputs) train fully, so no LoRA may sit inside them
            target, exclude = "all-linear", heads or None
        return LoraConfig(
            task_type=task_type,
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
            lora_dropout=self.cfg.dropout,
            target_modules=target,
            exclude_modules=exclude,
            modules_to_save=heads,
        )
