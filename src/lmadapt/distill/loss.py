"""Knowledge-distillation losses (Hinton et al., 2015, "Distilling the Knowledge in a Neural
Network"): soften both distributions with temperature T and scale the KL by T² so its gradients
keep the magnitude of the hard-label loss as T changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


def soft_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) || softmax(student/T)) per row, shape = logits shape minus C.

    `teacher` may be logits or log-probabilities (softmax ignores the difference). Rows where
    `mask` is 0 (padding tokens) come out as 0.
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student.float() / t, -1),
        F.log_softmax(teacher.float() / t, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    kl = kl * t * t
    return kl if mask is None else kl * mask.to(kl.dtype)


class DistillationTask:
    """A task whose training loss is α·CE(labels) + (1-α)·T²·KL(teacher_T || student_T).

    Training features carry the teacher's cached log-probabilities (`teacher_logits`, computed
    once); rows without a gold label (label -100) get α = 0, i.e. the teacher's signal only.
    Everything else (metrics, decoding, dev loss) is the wrapped task's.
    """

    def __init__(self, task: Task, alpha: float, temperature: float):
        self.task, self.alpha, self.temperature = task, alpha, temperature

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "teacher_logits" not in batch:
            return self.task.loss(logits, batch)
        logits = logits.float()  # (B, C)
        labels = batch["labels"]  # (B,), -100 = unlabelled
        has = labels != -100
        alpha = torch.where(has, self.alpha, 0.0)
        ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * has
        kd = soft_kl(logits, batch["teacher_logits"], self.temperature)
        return (alpha * ce + (1 - alpha) * kd).mean()
