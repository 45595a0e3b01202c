"""Online EWC (Schwarz et al., 2018, "Progress & Compress", sec. 2.3).

After task k the diagonal Fisher F_k is estimated on k's training data and folded into a running
estimate F* = γ·F* + F_k; the anchor θ* becomes the current weights. Later tasks pay
λ/2 · Σ_i F*_i (θ_i - θ*_i)² (Kirkpatrick et al., 2017, eq. 3, with the online Fisher).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import (
    AnchoredConfig,
    AnchoredStrategy,
    trainable_named,
)
from lmadapt.errors import ConfigError

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot


@dataclass
class EwcConfig(AnchoredConfig):
    name: str = "ewc"
    strength: float = 1e6
    """λ. The empirical Fisher of a 22M-parameter encoder is tiny per weight (~1e-7), hence the
    large default."""
    gamma: float = 1.0
    """γ: decay of the running Fisher per task (1 = plain sum over tasks)."""
    fisher_samples: int = 256
    """Training examples (one backward pass each) for the Fisher estimate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ConfigError("strategy.gamma", f"must be in [0, 1], got {self.gamma}")
        if self.fisher_samples < 1:
            raise ConfigError("strategy.fisher_samples", f"must be >= 1, got {self.fisher_samples}")


def diagonal_fisher(
    model: torch.nn.Module,
    loss_fn: Any,
    features: Sequence[dict[str, Any]],
    collator: Any,
    samples: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over examples of the squared per-example gradient.

    Uses the gold labels (the "empirical" Fisher; Kunstner et al., 2019 discuss the gap to the
    true one). Dropout is off; parameters that get no gradient (other tasks' heads) are left out.
    """
    params = trainable_named(model)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    got: set[str] = set()
    idx = random.Random(seed).sample(range(len(features)), min(samples, len(features)))
    was_training = model.training
    model.eval()
    try:
        for i in idx:
            batch = collator([features[i]])
            model.zero_grad(set_to_none=True)
            loss_fn(model(**batch).logits.float(), batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.detach().pow(2)
                    got.add(n)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: sums[n] / len(idx) for n in params if n in got}


@STRATEGIES.register("ewc", EwcConfig)
class Ewc(AnchoredStrategy):
    """Online EWC: penalty λ/2·Σ F*(θ-θ*)² with a running diagonal Fisher (Schwarz et al. 2018)."""

    cfg: EwcConfig

    def __init__(self, cfg: EwcConfig):
        super().__init__(cfg)
        self.fisher: dict[str, torch.Tensor] = {}

    def after_task(self, learner: Learner, slot: TaskSlot) -> None:
        fisher = diagonal_fisher(
            learner.model,
            slot.task.loss,
            slot.train_features,
            slot.collator,
            self.cfg.fisher_samples,
            learner.seed,
        )
        self.consolidate(trainable_named(learner.model), fisher)

    def consolidate(
        self, params: dict[str, torch.nn.Parameter], fisher: dict[str, torch.Tensor]
    ) -> None:
        """F* = γ·F* + F_new; anchor every parameter with a Fisher at its current value."""
        g = self.cfg.gamma
        merged = {n: g * f for n, f in self.fisher.items()}
        for n, f in fisher.items():
            merged[n] = merged[n] + f if n in merged else f
        self.fisher = merged
        self.anchor.set(params, self.fisher)
