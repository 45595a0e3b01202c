"""Learning without Forgetting (Li & Hoiem, 2016, arXiv:1606.09282).

Before a new task trains, every old head's outputs on the new task's inputs are recorded once
(the model is still the previous one then). During training a distillation term keeps each old
head's outputs close to those records: T²·KL(old_T || new_T), T = 2 as in the paper, averaged
over examples (and tokens, for token-level heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import Strategy, StrategyConfig
from lmadapt.distill.loss import soft_kl
from lmadapt.errors import ConfigError
from lmadapt.inference import autocast, batched_logits

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot


@dataclass
class LwfConfig(StrategyConfig):
    name: str = "lwf"
    temperature: float = 2.0
    weight: float = 1.0
    """λ_o: weight of the old-head distillation term (1 in the paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ConfigError("strategy.temperature", f"must be > 0, got {self.temperature}")
        if self.weight < 0:
            raise ConfigError("strategy.weight", f"must be >= 0, got {self.weight}")


def _key(ids: list[int]) -> tuple[int, ...]:
    return tuple(ids)


@STRATEGIES.register("lwf", LwfConfig)
class Lwf(Strategy):
    """Distil the previous model's old-head outputs on the new data (Li & Hoiem 2016)."""

    cfg: LwfConfig

    def __init__(self, cfg: LwfConfig):
        super().__init__(cfg)
        self.targets: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
        """Old task -> recorded outputs, keyed by the input ids (equal inputs, equal outputs)."""

    def before_task(self, learner: Learner, slot: TaskSlot) -> None:
        self.targets = {}
        for name in [n for n in learner.seen if n != slot.name]:
            learner.activate(name)
            logits, _ = batched_logits(
                learner.model,
                slot.train_features,
                slot.collator,
                learner.eval_batch_size,
                per_token=learner.slots[name].task.per_token,
            )
            keys = [_key(f["input_ids"]) for f in slot.train_features]
            self.targets[name] = dict(zip(keys, logits))
        learner.activate(slot.name)

    def loss_term(self, model: torch.nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if not self.targets:
            return None
        mask = batch["attention_mask"]  # (B, T)
        lengths = mask.sum(-1).tolist()
        keys = [_key(row[:n]) for row, n in zip(batch["input_ids"].tolist(), lengths)]
        total: Any = 0.0
        for name, table in self.targets.items():
            with autocast(self.bf16):
                new = model(task=name, **batch).logits  # (B, C) or (B, T, C)
            old = torch.zeros(new.shape, dtype=torch.float32)
            for i, k in enumerate(keys):
                rec = torch.from_numpy(table[k])
                old[i, : rec.shape[0]] = rec
            if new.dim() == 3:  # token-level head: mean over real tokens
                kl = soft_kl(new, old, self.cfg.temperature, mask)
                total = total + kl.sum() / mask.sum()
            else:
                total = total + soft_kl(new, old, self.cfg.temperature).mean()
        return self.cfg.weight * total / len(self.targets)
