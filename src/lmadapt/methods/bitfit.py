"""BitFit (Ben Zaken et al., 2022, arXiv:2106.10199): train only bias terms, plus the task head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmadapt.errors import ConfigError
from lmadapt.methods.base import WholeModelMethod, unfreeze_modules

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


class BitFit(WholeModelMethod):
    """BitFit: bias terms and the task head train; everything else is frozen."""

    # its weight matrices are frozen: like the PEFT methods it trains without dropout (SUBJ,
    # 3 seeds: test accuracy 0.9307 with the model's dropout, 0.9300 without, 1.37x faster)
    base_dropout = 0.0

    def apply(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
        """Refused for a base without bias terms (Llama-style models such as SmolLM2): there
        BitFit would train the task head alone, or nothing at all for generation."""
        head = task.head_modules(model)
        biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") or n == "bias"}
        if all(set(n.split(".")[:-1]) & set(head) for n in biases):
            raise ConfigError(
                "method",
                f"bitfit trains the base model's bias terms and {type(model).__name__} has none "
                f"(it would train {'only the task head' if head else 'nothing'}); "
                "use lora or ia3 instead",
            )
        for name, p in model.named_parameters():
            p.requires_grad_(name in biases)
        unfreeze_modules(model, head)
        return model
