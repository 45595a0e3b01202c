"""L2 toward the previous task's weights: λ/2 Σ (θ - θ*)², the unweighted form of EWC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import (
    AnchoredConfig,
    AnchoredStrategy,
    trainable_named,
)

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot


@dataclass
class L2Config(AnchoredConfig):
    name: str = "l2"
    strength: float = 0.05
    """λ: weight of the squared distance to the weights after the previous task."""


@STRATEGIES.register("l2", L2Config)
class L2(AnchoredStrategy):
    """Penalty λ/2·Σ(θ-θ*)² toward the weights left by the previous task."""

    def after_task(self, learner: Learner, slot: TaskSlot) -> None:
        self.anchor.set(trainable_named(learner.model))
