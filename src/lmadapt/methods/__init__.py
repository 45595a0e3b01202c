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
        ("adalora", c.AdaLoraMethodConfig, "AdaLora"),
        ("adapter", c.AdapterConfig, "Adapter"),
        ("bitfit", c.BitFitConfig, "BitFit"),
        ("full", c.FullConfig, "Full"),
        ("ia3", c.IA3MethodConfig, "IA3"),
        ("lora", c.LoraMethodConfig, "Lora"),
        ("p_tuning", c.PTuningMethodConfig, "PTuning"),
        ("prefix_tuning", c.PrefixTuningMethodConfig, "PrefixTuning"),
        ("prompt_tuning", c.PromptTuningMethodConfig, "PromptTuning"),
    ],
)

__all__ = ["METHODS", "build_method"]


def build_method(config: c.MethodConfig) -> Method:
    return METHODS.get(config.name).impl(config)
