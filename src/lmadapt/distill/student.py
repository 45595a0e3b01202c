"""Student construction: a pretrained encoder cut to its first k blocks (Sanh et al., 2019,
DistilBERT, initialise the student from the teacher's layers; here simply the bottom k)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmadapt.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def keep_first_layers(model: PreTrainedModel, k: int) -> None:
    """Drop every transformer block after the k-th, in place, and record it in the config."""
    n = model.config.num_hidden_layers
    if not 1 <= k <= n:
        raise ConfigError("student_layers", f"must be in [1, {n}] for this model, got {k}")
    blocks = next(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None
    )
    if blocks is None:
        raise ConfigError(
            "student_layers", f"no list of {n} blocks found in {type(model).__name__}"
        )
    del blocks[k:]
    model.config.num_hidden_layers = k
