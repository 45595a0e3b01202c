"""Shared config of the prompt-learning methods (prompt tuning, prefix tuning, P-tuning): a number
of virtual tokens prepended to every input, with the task head trained alongside."""

from __future__ import annotations

from dataclasses import dataclass

from lmadapt.errors import ConfigError
from lmadapt.methods.base import MethodConfig


@dataclass
class VirtualTokensConfig(MethodConfig):
    num_virtual_tokens: int = 20
    """Prompt length. 20 is where the papers' curves flatten for base-size models; each virtual
    token also lengthens every sequence, so costs compute at train and inference time."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                "method.num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}"
            )
