"""Method protocol and the two ways an adapted model is saved: whole model, or a peft adapter."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from lmadapt.hooks import Hook
from lmadapt.methods.configs import MethodConfig
from lmadapt.models import ModelSpec, refuse_pickled

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from peft import PeftModel
    from transformers import PreTrainedModel

    from lmadapt.tasks.base import Task


C = TypeVar("C", bound=MethodConfig)


class Method(Protocol):
    cfg: MethodConfig
    mergeable: bool
    saves_whole_model: bool
    """The artifact holds every weight (else only the trained ones): sizes the disk check."""
    quantized_base: bool
    """Whether it can train over a 4/8-bit base (QLoRA): it adds weights beside the base's
    linear layers and trains none of the base's own."""
    base_dropout: float | None
    """The base model's dropout while this method trains, unless `train.dropout` or the task
    says: 0 where the base's weights are frozen (PEFT methods, adapters, BitFit: accuracy within
    noise or better over 3 seeds of 5 scenarios, LoRA 1.5x faster;
    bench/results/dropout_default.md), None (the model's own) where they train. The method's
    own dropout (LoRA's `dropout`) is its setting, not this."""

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        """Freeze / wrap `model` so that only this method's parameters train."""

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the artifact: a transformers model dir, or a peft adapter dir."""

    def load(
        self, task: Task, base: ModelSpec, artifact: Path, trust_remote_code: bool = False
    ) -> torch.nn.Module:
        """Rebuild the trained model from a saved artifact."""

    def hooks(self, model: torch.nn.Module, total_steps: int) -> list[Hook]:
        """What the method adds to the training loop (schedules, loss terms); often nothing."""

    def lr_rules(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name part (e.g. LoRA+'s {"lora_B": 16}): a
        parameter with that part in its dotted name trains at the run's rate times it (the head
        keeps its own rate). Empty for one rate."""


class NoHooks:
    """For methods that need nothing from the loop beyond the task loss at one learning rate."""

    def hooks(self, model: torch.nn.Module, total_steps: int) -> list[Hook]:
        return []

    def lr_rules(self) -> dict[str, float]:
        return {}


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def unfreeze_modules(model: torch.nn.Module, names: list[str]) -> None:
    """Make every parameter under a module whose last name part is in `names` trainable."""
    for mod_name, module in model.named_modules():
        if mod_name.split(".")[-1] in names:
            for p in module.parameters():
                p.requires_grad_(True)


class WholeModelMethod(NoHooks):
    """Methods that change the model's own weights and save it as a transformers model dir."""

    mergeable = False
    quantized_base = False
    saves_whole_model = True
    base_dropout: float | None = None

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        # a transformers model: the task built it
        cast("PreTrainedModel", model).save_pretrained(out_dir, safe_serialization=True)

    def load(
        self, task: Task, base: ModelSpec, artifact: Path, trust_remote_code: bool = False
    ) -> torch.nn.Module:
        refuse_pickled(artifact, "saved model")
        spec = ModelSpec(base.name, str(artifact), base.kind)
        return task.build_model(spec, trust_remote_code)


class PeftMethod(NoHooks, Generic[C]):
    """Methods implemented by peft: subclasses build the peft config, peft does the rest.
    Parametrised by the method's own config class, so `self.cfg` has its fields."""

    mergeable = False
    saves_whole_model = False
    quantized_base = False
    base_dropout: float | None = 0.0
    mixed_batches = False
    """Whether one forward pass can run rows through different adapters of this method loaded
    in one PeftModel (peft's `adapter_names`), as a server batching several runs does."""

    def __init__(self, cfg: C):
        self.cfg = cfg

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        raise NotImplementedError

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model, task, task.peft_task_type))

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        # the peft model apply() returned; peft types the directory as str
        cast("PeftModel", model).save_pretrained(str(out_dir), safe_serialization=True)

    def load(
        self, task: Task, base: ModelSpec, artifact: Path, trust_remote_code: bool = False
    ) -> torch.nn.Module:
        from peft import PeftModel

        refuse_pickled(artifact, "saved adapter")
        return PeftModel.from_pretrained(task.build_model(base, trust_remote_code), artifact)
