"""Shared config of the prompt-learning methods (prompt tuning, prefix tuning, P-tuning): a number
of virtual tokens prepended to every input, with the task head trained alongside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass
class EncodedTokensConfig(VirtualTokensConfig):
    """Virtual tokens produced by a trained encoder (P-tuning's prompt encoder, prefix tuning's
    reparameterising MLP), whose width may be set."""

    encoder_hidden_size: int | None = None
    """Hidden width of the encoder; None = the model's hidden size."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                "method.encoder_hidden_size", f"must be >= 1, got {self.encoder_hidden_size}"
            )

    def sized(self, config: Any) -> Any:
        """peft's `config` with the encoder width set, when one is given (else peft takes the
        model's hidden size: its field is typed int but defaults to None)."""
        if self.encoder_hidden_size is not None:
            config.encoder_hidden_size = self.encoder_hidden_size
        return config
