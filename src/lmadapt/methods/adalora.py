"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512) through peft: SVD-shaped LoRA, P·Λ·Q, whose
rank budget is pruned during training by an importance score, from init_r down to target_r.

peft leaves two things to the training loop, done here with trainer hooks: the budget schedule
(`update_and_allocate` after each optimizer step, with that step's gradients) and the orthogonal
regulariser on P and Q (peft adds it only to a loss computed from `labels`, which we never pass).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lmadapt.hooks import Hook
from lmadapt.methods.base import PeftMethod
from lmadapt.methods.configs import AdaLoraMethodConfig
from lmadapt.models import ModelSpec

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from peft import AdaLoraConfig, AdaLoraModel, PeftModel

    from lmadapt.tasks.base import Task

ADAPTER = "default"


class AdaLora(PeftMethod[AdaLoraMethodConfig]):
    """AdaLoRA via peft: LoRA whose per-matrix rank is pruned to a budget by importance."""

    mergeable = True
    quantized_base = True

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import AdaLoraConfig

        c = self.cfg
        return AdaLoraConfig(
            task_type=task_type,
            init_r=c.init_r,
            target_r=c.target_r,
            lora_alpha=c.alpha,  # type: ignore[arg-type]  # peft says int; alpha / r takes a float
            lora_dropout=c.dropout,
            target_modules=c.target_modules,
            modules_to_save=task.head_modules(model),
            deltaT=c.delta_t,
            beta1=c.beta1,
            beta2=c.beta2,
            orth_reg_weight=c.orth_reg_weight,
            # The step count is only known once the trainer exists; hooks() sets the real one.
            total_step=1,
        )

    def load(
        self, task: Task, base: ModelSpec, artifact: Path, trust_remote_code: bool = False
    ) -> torch.nn.Module:
        with warnings.catch_warnings():
            # peft's LoRA check reads AdaLoRA's rank_pattern (pruning masks, applied correctly by
            # AdaLoRA on load) as LoRA rank overrides and warns that they match no module.
            warnings.filterwarnings("ignore", "The following rank_pattern keys", RuntimeWarning)
            return super().load(task, base, artifact, trust_remote_code)

    def hooks(self, model: torch.nn.Module, total_steps: int) -> list[Hook]:
        """Set the budget schedule to the trainer's step count and return the schedule hook."""
        # the object peft's rank allocator reads, in the peft model apply() returned
        peft_cfg = cast("AdaLoraConfig", cast("PeftModel", model).peft_config[ADAPTER])
        peft_cfg.total_step = total_steps
        peft_cfg.tinit = int(self.cfg.tinit_ratio * total_steps)
        peft_cfg.tfinal = int(self.cfg.tfinal_ratio * total_steps)
        return [AdaLoraSchedule(model, self.cfg.orth_reg_weight)]


class AdaLoraSchedule(Hook):
    """Budget re-allocation after each step, the orthogonal penalty, and the final rank mask."""

    def __init__(self, model: torch.nn.Module, orth_reg_weight: float):
        self.model = model  # the peft model itself, however the trainer wraps it
        self.orth_reg_weight = orth_reg_weight
        self.grads: dict[str, torch.Tensor | None] = {}
        self.handles: list[Any] = []

    @property
    def tuner(self) -> AdaLoraModel:
        """peft's AdaLoRA tuner under the peft model: it holds the rank allocator."""
        return cast("AdaLoraModel", self.model.base_model)

    def on_train_start(self, trainer: Any) -> None:
        self.params = {
            n: p for n, p in self.model.named_parameters() if "lora_" in n and p.requires_grad
        }
        self.factors = [
            (n, p) for n, p in self.params.items() if ".lora_A." in n or ".lora_B." in n
        ]
        # The loop zeroes gradients before on_step_end, but the importance score needs them:
        # keep a reference to each accumulated gradient and restore it for the allocation.
        for name, p in self.params.items():
            self.handles.append(p.register_post_accumulate_grad_hook(self._keeper(name)))

    def _keeper(self, name: str) -> Any:
        def keep(p: torch.Tensor) -> None:
            self.grads[name] = p.grad

        return keep

    def loss_term(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        if not self.orth_reg_weight or not self.factors:
            return None
        return self.orth_reg_weight * orthogonal_penalty(self.factors)

    def on_step_end(self, trainer: Any) -> None:
        for name, p in self.params.items():
            p.grad = self.grads.get(name)
        self.tuner.update_and_allocate(trainer.state.step)
        for p in self.params.values():
            p.grad = None
        self.grads.clear()

    def on_train_end(self, trainer: Any) -> None:
        for handle in self.handles:
            handle.remove()
        # The restored best checkpoint may predate the final allocation; mask it with the ranks
        # that will be saved, so the evaluated model is the saved one.
        base = self.tuner
        pattern = cast("AdaLoraConfig", base.peft_config[ADAPTER]).rank_pattern
        if pattern:
            base.rankallocator.mask_using_rank_pattern(base.model, pattern)


def orthogonal_penalty(factors: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Mean of ||PᵀP - I||_F over P (lora_B) and ||QQᵀ - I||_F over Q (lora_A), as in peft."""
    total: torch.Tensor | None = None
    for name, p in factors:
        cov = p @ p.T if ".lora_A." in name else p.T @ p
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        norm = torch.linalg.matrix_norm(cov - eye)
        total = norm if total is None else total + norm
    if total is None:
        raise ValueError("orthogonal_penalty needs at least one LoRA factor")
    return total / len(factors)
