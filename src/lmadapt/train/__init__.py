"""The training loop, its hooks and checkpoints."""

from lmadapt.train.loop import Hook, Trainer, TrainResult

__all__ = ["Hook", "Trainer", "TrainResult"]
