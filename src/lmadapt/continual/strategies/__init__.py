"""Continual-learning strategies: one file each, registered with one `@STRATEGIES.register` line."""

from lmadapt.registry import Registry

STRATEGIES: Registry = Registry("strategy")

from lmadapt.continual.strategies import adapters, ewc, l2, lwf, naive, replay  # noqa: E402,F401
from lmadapt.continual.strategies.base import Strategy, StrategyConfig  # noqa: E402

__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "build_strategy"]


def build_strategy(config: StrategyConfig) -> Strategy:
    return STRATEGIES.get(config.name).impl(config)
