"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691) through peft: a trainable soft prompt of
virtual token embeddings prepended to the input; the model itself stays frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from lmadapt.hooks import Hook
from lmadapt.methods.base import PeftMethod
from lmadapt.methods.configs import PromptTuningMethodConfig

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from peft import PeftModel, PromptEmbedding
    from transformers import PreTrainedModel

    from lmadapt.tasks.base import Task

ADAPTER = "default"
PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}


class PromptTuning(PeftMethod[PromptTuningMethodConfig]):
    """Prompt tuning via peft: a learned soft prompt of virtual tokens; the head trains."""

    def peft_config(self, model: torch.nn.Module, task: Task, task_type: str) -> Any:
        from peft import PromptTuningConfig

        c = self.cfg
        text = c.init == "text"  # peft tokenizes the text with the model's own tokenizer
        return PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=c.num_virtual_tokens,
            prompt_tuning_init=PEFT_INIT[c.init],
            modules_to_save=task.head_modules(model),
            prompt_tuning_init_text=c.init_text if text else None,
            tokenizer_name_or_path=cast("PreTrainedModel", model).name_or_path if text else None,
        )

    def hooks(self, model: torch.nn.Module, total_steps: int) -> list[Hook]:
        if not self.cfg.l2_penalty:
            return []
        # the peft model apply() returned; prompt tuning's encoder is a PromptEmbedding
        encoder = cast("PromptEmbedding", cast("PeftModel", model).prompt_encoder[ADAPTER])
        return [PromptL2(encoder.embedding.weight, self.cfg.l2_penalty)]


class PromptL2(Hook):
    """λ·||P||² on the soft prompt, added to every training batch's loss."""

    def __init__(self, prompt: torch.Tensor, weight: float):
        self.prompt, self.weight = prompt, weight

    def loss_term(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor:
        return self.weight * self.prompt.pow(2).sum()
