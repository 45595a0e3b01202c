"""What every task provides to the trainer, evaluation and prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmadapt.data.validation import BadRows
from lmadapt.evaluate.metrics import Evaluation


class Task(Protocol):
    kind: str
    """Task name, also used by methods to pick a peft task type."""
    default_metric: str
    metric_names: tuple[str, ...]
    """Every scalar its dev evaluation reports (what `train.metric` may name)."""

    def read(
        self, path: str, fmt: str, labelled: bool = True, bad: BadRows | None = None
    ) -> list[Any]:
        """Read and validate one file into examples (errors name file, line and field).

        Rows with a problem are left out and recorded in `bad`, whose owner decides whether
        the file is refused; without `bad`, every bad row is raised in one DataError.
        """

    def fit(self, train: list[Any]) -> None:
        """Learn what the task needs from the training examples (e.g. the label set)."""

    def check(self, examples: list[Any], bad: BadRows | None = None) -> list[Any]:
        """Validate non-training examples against what was learned (e.g. unseen labels);
        returns the ones that pass, the others going to `bad` as in `read`."""

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state saved with the run (labels, problem type)."""

    def encode(self, examples: list[Any], tokenizer: Any) -> list[dict[str, Any]]: ...

    def collator(self, tokenizer: Any) -> Any: ...

    def build_model(self, spec: Any, trust_remote_code: bool = False) -> torch.nn.Module: ...

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        """Names of freshly initialised head modules that every method must train."""

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, logits: np.ndarray, examples: list[Any]) -> Evaluation: ...

    def decode(self, logits: np.ndarray, examples: list[Any]) -> list[dict[str, Any]]: ...

    def report(self, evaluation: Evaluation) -> str:
        """Markdown sections for report.md."""

    def plots(self, evaluation: Evaluation, out_dir: Path, prefix: str) -> list[Path]: ...

    def examples_from_texts(self, texts: list[str]) -> list[Any]:
        """Unlabelled examples for prediction."""
