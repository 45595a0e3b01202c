"""What a strategy is: a `Hook` of the one training loop plus stream-level events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmadapt.errors import ConfigError
from lmadapt.train.loop import Hook, Trainer

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot


@dataclass
class StrategyConfig:
    name: str
    lr: float = 5e-5
    """Default peak learning rate when train.lr is unset (full fine-tuning of the backbone)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("strategy.lr", f"must be > 0, got {self.lr}")


@dataclass
class AnchoredConfig(StrategyConfig):
    """The config of an `AnchoredStrategy` (EWC, L2): it names the penalty's weight λ."""

    strength: float = 0.0
    """λ: weight of the anchor penalty (each strategy sets its own default)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength < 0:
            raise ConfigError("strategy.strength", f"must be >= 0, got {self.strength}")


class Strategy(Hook):
    """Hook methods act inside one task's training; the rest around it, for the whole stream."""

    frozen_past = False
    """True when earlier tasks cannot change at all; the runner then checks it bit for bit."""

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.bf16 = False

    def on_train_start(self, trainer: Trainer) -> None:
        self.bf16 = trainer.bf16

    def on_activate(self, learner: Learner, name: str) -> None:
        """Task `name` is about to be evaluated or trained (e.g. switch its adapter on)."""

    def before_task(self, learner: Learner, slot: TaskSlot) -> None:
        """Before training on `slot.train_features` (task `slot.name` is active)."""

    def after_task(self, learner: Learner, slot: TaskSlot) -> None:
        """After training on `slot.train_features`, best checkpoint restored."""


class QuadraticAnchor:
    """Σ_k w_k (θ_k - θ*_k)² over anchored parameters: the shape of the EWC and L2 penalties."""

    def __init__(self) -> None:
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []

    def set(
        self,
        params: dict[str, torch.nn.Parameter],
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Anchor at the parameters' current values; with `weights`, only the weighted ones."""
        names = list(weights) if weights is not None else list(params)
        self.terms = [
            (params[n], params[n].detach().clone(), None if weights is None else weights[n])
            for n in names
        ]

    def __call__(self) -> torch.Tensor | None:
        if not self.terms:
            return None
        total: Any = 0.0
        for p, anchor, w in self.terms:
            sq = (p.float() - anchor).pow(2)
            total = total + (sq.sum() if w is None else (w * sq).sum())
        return total


class AnchoredStrategy(Strategy):
    """EWC and L2: a penalty λ/2 · `anchor()` (λ = `cfg.strength`) added to the task loss, where
    the subclass sets the anchor after each task."""

    cfg: AnchoredConfig

    def __init__(self, cfg: AnchoredConfig):
        super().__init__(cfg)
        self.anchor = QuadraticAnchor()

    def penalty(self) -> torch.Tensor | None:
        total = self.anchor()
        return None if total is None else 0.5 * self.cfg.strength * total

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        return self.penalty()


def trainable_named(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
