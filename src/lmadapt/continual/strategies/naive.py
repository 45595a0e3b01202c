"""Sequential fine-tuning: each task in turn, nothing against forgetting (the lower baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from lmadapt.continual.strategies import STRATEGIES
from lmadapt.continual.strategies.base import Strategy, StrategyConfig


@dataclass
class NaiveConfig(StrategyConfig):
    name: str = "naive"


@STRATEGIES.register("naive", NaiveConfig)
class Naive(Strategy):
    """Sequential fine-tuning of backbone and head, task after task (forgets freely)."""
