"""Experience replay from a reservoir buffer (Vitter, 1985, algorithm R; Chaudhry et al., 2019,
"On Tiny Episodic Memories in Continual Learning").

Every training example of every finished task is offered to a fixed-size reservoir, which thus
holds a uniform sample of the stream so far. While a later task trains, each step adds the loss
of a replay mini-batch, each example through its own task's head and loss.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import Strategy, StrategyConfig
from lmadapt.errors import ConfigError
from lmadapt.inference import autocast

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot

T = TypeVar("T")


class Reservoir(Generic[T]):
    """Uniform sample of `capacity` items from a stream of unknown length (algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.items: list[T] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, item: T) -> None:
        # Item t (0-based) enters with probability capacity / (t + 1), evicting a uniform slot.
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.capacity:
                self.items[j] = item
        self.seen += 1

    def sample(self, k: int) -> list[T]:
        return self.rng.sample(self.items, min(k, len(self.items)))

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class ReplayConfig(StrategyConfig):
    name: str = "replay"
    buffer_size: int = 200
    """N: examples kept over the whole stream (reservoir)."""
    batch_size: int = 16
    """Replay examples per optimizer step (drawn from the buffer, mixed across old tasks)."""
    weight: float = 1.0
    """Weight of the replay loss beside the current task's loss."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("buffer_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"strategy.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.weight < 0:
            raise ConfigError("strategy.weight", f"must be >= 0, got {self.weight}")


@STRATEGIES.register("replay", ReplayConfig)
class Replay(Strategy):
    """Reservoir buffer of N old examples; each step adds their loss through their own heads."""

    cfg: ReplayConfig

    def __init__(self, cfg: ReplayConfig):
        super().__init__(cfg)
        self.buffer: Reservoir[tuple[str, dict[str, Any]]] | None = None
        self.learner: Learner | None = None

    def before_task(self, learner: Learner, slot: TaskSlot) -> None:
        self.learner = learner
        if self.buffer is None:
            self.buffer = Reservoir(self.cfg.buffer_size, learner.seed)

    def after_task(self, learner: Learner, slot: TaskSlot) -> None:
        assert self.buffer is not None
        for feature in slot.train_features:
            self.buffer.add((slot.name, feature))

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if not self.buffer or self.learner is None:
            return None
        drawn = self.buffer.sample(self.cfg.batch_size)
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for name, feature in drawn:
            groups[name].append(feature)
        total: Any = 0.0
        for name, feats in groups.items():
            slot = self.learner.slots[name]
            replay = slot.collator(feats)
            with autocast(self.bf16):
                logits = model(task=name, **replay).logits
            total = total + slot.task.loss(logits, replay) * (len(feats) / len(drawn))
        return self.cfg.weight * total
