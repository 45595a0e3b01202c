"""One LoRA adapter per task on a frozen backbone (peft multi-adapter), plus a head per task.

Task-incremental: the task id picks adapter and head at inference, so training task k touches
neither the backbone nor any earlier adapter or head, and earlier predictions cannot change
(BWT is exactly 0; the runner checks it bit for bit). Parameter isolation in the spirit of
progressive / adapter-based continual learning (Rusu et al., 2016; Houlsby et al., 2019).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import Strategy, StrategyConfig
from lmadapt.methods.configs import LowRankShape, check_lora_shape

if TYPE_CHECKING:
    from lmadapt.continual.runner import Learner, TaskSlot


@dataclass
class AdaptersConfig(LowRankShape, StrategyConfig):
    name: str = "adapters"
    lr: float = 5e-4
    r: int = 8
    dropout: float = 0.1  # not measured against 0 for continual learning: kept as it was

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lora_shape("strategy", self.r, self.dropout)


@STRATEGIES.register("adapters", AdaptersConfig)
class Adapters(Strategy):
    """A fresh LoRA adapter per task, backbone frozen; the task id picks adapter and head."""

    frozen_past = True

    cfg: AdaptersConfig

    def __init__(self, cfg: AdaptersConfig):
        super().__init__(cfg)
        self.peft: Any = None

    def _lora(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
        )

    def on_activate(self, learner: Learner, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.set_adapter(name, inference_mode=True)

    def before_task(self, learner: Learner, slot: TaskSlot) -> None:
        from peft import get_peft_model

        # LoRA layers are injected into the shared backbone in place, so every task model
        # (which holds that same module) runs through the active adapter.
        if self.peft is None:
            self.peft = get_peft_model(learner.model.backbone, self._lora(), adapter_name=slot.name)
        elif slot.name not in self.peft.peft_config:
            self.peft.add_adapter(slot.name, self._lora())
        learner.model.requires_grad_(False)
        self.peft.set_adapter(slot.name)  # its LoRA weights, and only those, become trainable
        for p in learner.model.head_parameters(slot.name):
            p.requires_grad_(True)
