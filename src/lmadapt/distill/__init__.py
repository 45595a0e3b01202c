"""Knowledge distillation: a teacher's label distributions (cached once) train a smaller student
in the one training loop, through a task wrapper whose loss mixes gold labels and soft targets."""

from lmadapt.distill.runner import run_distill

__all__ = ["run_distill"]
