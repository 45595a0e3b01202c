"""Adaptation methods: how a pretrained model is made trainable for a task.

One file per method (its implementation) and its config class in `configs`, registered below by
one line each. Registering by path keeps `import lmadapt.methods` (and so reading a run config)
free of torch and peft; a method's module is imported when a run builds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmadapt.methods import configs as c
from lmadapt.registry import Registry

if TYPE_CHECKING:
    from lmadapt.methods.base import Method

METHODS: Registry = Registry("method")
METHODS.lazy(
    "lmadapt.methods",
    [
        ("adalora", c.AdaLoraMethodConfig, "adalora:AdaLora"),
        ("adapter", c.AdapterConfig, "adapter:Adapter"),
        ("bitfit", c.BitFitConfig, "bitfit:BitFit"),
        ("full", c.FullConfig, "full:Full"),
        ("ia3", c.IA3MethodConfig, "ia3:IA3"),
        ("lora", c.LoraMethodConfig, "lora:Lora"),
        ("p_tuning", c.PTuningMethodConfig, "p_tuning:PTuning"),
        ("prefix_tuning", c.PrefixTuningMethodConfig, "prefix_tuning:PrefixTuning"),
        ("prompt_tuning", c.PromptTuningMethodConfig, "prompt_tuning:PromptTuning"),
    ],
)

__all__ = ["METHODS", "build_method"]


def build_method(config: c.MethodConfig) -> Method:
    return METHODS.get(config.name).impl(config)
