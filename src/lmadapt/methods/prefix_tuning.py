"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) through peft: trainable key/value prefixes
prepended in every attention layer, so each layer attends to learned virtual tokens."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.errors import ConfigError
from lmadapt.methods.base import PeftMethod
from lmadapt.methods.configs import PrefixTuningMethodConfig

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


class PrefixTuning(PeftMethod[PrefixTuningMethodConfig]):
    """Prefix tuning via peft: learned key/value prefixes in every layer; the head trains."""

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        if not takes_prefixes(model):
            import transformers

            raise ConfigError(
                "method.name",
                f"prefix_tuning needs a model whose forward takes `past_key_values`; "
                f"{type(model).__name__} in transformers {transformers.__version__} does not, so "
                "peft cannot insert the prefixes. Use p_tuning or prompt_tuning (virtual tokens "
                "on the input), or lora",
            )
        return super().apply(model, task)

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import PrefixTuningConfig

        return self.cfg.sized(
            PrefixTuningConfig(
                task_type=task_type,
                num_virtual_tokens=self.cfg.num_virtual_tokens,
                prefix_projection=self.cfg.prefix_projection,
                modules_to_save=task.head_modules(model),
            )
        )


def takes_prefixes(model: torch.nn.Module) -> bool:
    """Whether peft can hand prefixes to `model`: it passes them as `past_key_values` to the task
    model's forward or, for encoder heads, to the backbone's (upstream renames break this)."""
    if "past_key_values" in inspect.signature(model.forward).parameters:
        return True
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return (
        backbone is not None and "past_key_values" in inspect.signature(backbone.forward).parameters
    )
