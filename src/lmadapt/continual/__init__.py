"""Continual learning: a stream of tasks on one shared backbone, one head per task.

Each strategy (naive, ewc, l2, replay, lwf, adapters) plugs into the one training loop as a
`Hook`; `run_continual` trains the stream, measures the accuracy matrix and writes the report.
"""

from lmadapt.continual.runner import run_continual, run_continual_many

__all__ = ["run_continual", "run_continual_many"]
