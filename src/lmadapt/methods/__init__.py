"""Adaptation methods: how a pretrained model is made trainable for a task.

One file per method, each registered with one `@METHODS.register(name, ConfigCls)` line.
"""

from lmadapt.registry import Registry

METHODS: Registry = Registry("method")

from lmadapt.methods import (  # noqa: E402,F401  (register themselves)
    adalora,
    adapter,
    bitfit,
    full,
    ia3,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
from lmadapt.methods.base import Method, MethodConfig, count_parameters  # noqa: E402

__all__ = ["METHODS", "Method", "MethodConfig", "build_method", "count_parameters"]


def build_method(config: MethodConfig) -> Method:
    return METHODS.get(config.name).impl(config)
