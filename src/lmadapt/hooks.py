"""The training loop's extension point, on the bottom floor so that methods and strategies can
add hooks without importing the loop (and torch.distributed with it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmadapt.train.loop import Trainer


class Hook:
    """Extension point of the loop; override what you need (all no-ops by default)."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def loss_term(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """An extra term added to the task loss for this batch (e.g. an EWC penalty)."""
        return None

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...
