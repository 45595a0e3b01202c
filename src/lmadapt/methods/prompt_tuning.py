"""Prompt tuning (Lester et al., 2021, arXiv:2104.08691) through peft: a trainable soft prompt of
virtual token embeddings prepended to the input; the model itself stays frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.methods import METHODS
from lmadapt.methods.base import PeftMethod
from lmadapt.methods.prompt_common import VirtualTokensConfig

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from peft import PeftModel, PromptEmbedding
    from transformers import PreTrainedModel

    from lmadapt.tasks.base import Task

ADAPTER = "default"
PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}


@dataclass
class PromptTuningMethodConfig(VirtualTokensConfig):
    name: str = "prompt_tuning"
    lr: float = 3e-3
    """The paper uses 0.3 (Adafactor, T5-XXL) for the prompt alone, but here the task head trains at
    the same rate: on MiniLM / SST-2, 1e-2 and above blew up the head (loss 1.1 after 5 steps,
    then stuck at chance), 3e-3 learnt steadily."""
    init: Literal["vocab", "random", "text"] = "vocab"
    """vocab: embeddings of randomly sampled vocabulary tokens (better than random in the paper);
    random: peft's random init; text: the embeddings of init_text, repeated to fill the prompt."""
    init_text: str | None = None
    """Prompt text for init=text, e.g. "Is the sentiment of this review positive or negative?"."""
    l2_penalty: float = 0.0
    """λ of an extra loss term λ·||P||² on the prompt embeddings P, keeping them near the scale of
    real token embeddings; 0 disables it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init == "text" and not (self.init_text or "").strip():
            raise ConfigError("method.init_text", "is required when method.init is 'text'")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError("method.init_text", "is only used with method.init=text")
        if self.l2_penalty < 0:
            raise ConfigError("method.l2_penalty", f"must be >= 0, got {self.l2_penalty}")


@METHODS.register("prompt_tuning", PromptTuningMethodConfig)
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
