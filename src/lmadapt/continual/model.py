"""One shared backbone, one head per task: each task's own model, its backbone swapped out.

Every task builds its model as usual (`task.build_model`), then the model's backbone attribute
(`base_model_prefix`, e.g. `bert`) is replaced by the one shared module. So each task's `loss`,
`evaluate` and `encode` work unchanged, and a head is whatever the task model adds on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from lmadapt.inference import model_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class MultiTaskModel(torch.nn.Module):
    """`model(**batch)` runs the active task's model; `model(task=name, **batch)` any other."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.task_models = torch.nn.ModuleDict()
        self.active: str | None = None

    def add_task(self, name: str, task_model: torch.nn.Module) -> None:
        prefix = cast("PreTrainedModel", task_model).base_model_prefix  # a transformers model
        if not isinstance(getattr(task_model, prefix, None), torch.nn.Module):
            raise TypeError(f"{type(task_model).__name__} has no backbone attribute '{prefix}'")
        setattr(task_model, prefix, self.backbone)
        self.task_models[name] = task_model

    def head_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Parameters of task `name` that are not part of the shared backbone."""
        shared = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.task_models[name].parameters() if id(p) not in shared]

    def forward(self, task: str | None = None, **inputs: Any) -> Any:
        name = task or self.active
        if name is None:
            raise RuntimeError("no active task: set model.active or pass task=")
        return self.task_models[name](**model_inputs(inputs))
