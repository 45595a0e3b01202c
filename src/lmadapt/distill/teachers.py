"""Teachers: anything that gives a label distribution per example.

A teacher is a small protocol, so a fine-tuned run, a prompted LLM or a test double plug in the
same way. Its distributions are computed once per data split and cached in the features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy.special import softmax

from lmadapt.errors import ConfigError
from lmadapt.registry import Registry

TEACHERS: Registry = Registry("teacher")


class Teacher(Protocol):
    labels: list[str]
    """Label names, in the order of the distribution's columns."""
    num_parameters: int
    name: str
    whole_set: bool
    """Its distributions depend on every row it is asked about at once (a prior estimated over
    them): it is asked once for all of them, rather than a chunk of rows at a time."""

    def label_distribution(self, examples: list[Any]) -> np.ndarray:
        """(N, C) probabilities over `labels`, one row per example."""


@dataclass
class RunTeacherConfig:
    type: str = "run"
    run_dir: str = ""
    """A finished `lmadapt train` run directory with a single-label classification head."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ConfigError("teacher.run_dir", "is required")
        if self.batch_size < 1:
            raise ConfigError("teacher.batch_size", f"must be >= 1, got {self.batch_size}")


@TEACHERS.register("run", RunTeacherConfig)
class RunTeacher:
    """A fine-tuned lmadapt run: softmax of its classifier's logits."""

    def __init__(self, cfg: RunTeacherConfig):
        from lmadapt.api import load_run
        from lmadapt.methods.base import count_parameters

        self.cfg = cfg
        self.run = load_run(cfg.run_dir)
        task = self.run.task
        if not (task.label_distribution and task.shares_backbone):
            raise ConfigError(
                "teacher.run_dir",
                f"{cfg.run_dir} is a {task.description} run; "
                "distillation needs a single-label classification teacher",
            )
        self.labels = list(task.labels)
        self.whole_set = False
        self.num_parameters = count_parameters(self.run.model)[1]
        self.name = f"run {cfg.run_dir} ({self.run.spec.name}, {self.run.config.method.name})"

    def label_distribution(self, examples: list[Any]) -> np.ndarray:
        from lmadapt.inference import batched_logits

        task, tok = self.run.task, self.run.tokenizer
        # inputs only: rows with and without gold labels (an unlabelled file) batch together
        feats = [{k: v for k, v in f.items() if k != "labels"} for f in task.encode(examples, tok)]
        logits, _ = batched_logits(self.run.model, feats, task.collator(tok), self.cfg.batch_size)
        return softmax(np.stack(logits).astype(np.float64), axis=-1)  # (N, C)


@dataclass
class PromptTeacherConfig:
    type: str = "prompt"
    config: str = ""
    """An `lmadapt prompt` config (verbalizer mode): the LLM's zero/few-shot label scores."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for that config, e.g. ["calibration=false", "k=8"]."""

    def __post_init__(self) -> None:
        if not self.config:
            raise ConfigError("teacher.config", "is required (an `lmadapt prompt` config file)")


@TEACHERS.register("prompt", PromptTeacherConfig)
class PromptTeacher:
    """A prompted LLM: its verbalizer label distribution (calibrated if the config says so)."""

    def __init__(self, cfg: PromptTeacherConfig):
        from lmadapt.methods.base import count_parameters
        from lmadapt.prompting.config import load_prompt_config
        from lmadapt.prompting.sources import load_lm
        from lmadapt.prompting.teacher import LabelScorer

        pcfg = load_prompt_config(cfg.config, cfg.overrides)
        self.scorer = LabelScorer(pcfg)
        self.labels = self.scorer.labels
        self.whole_set = pcfg.calibration == "domain"  # one prior over all the rows scored
        self.num_parameters = count_parameters(load_lm(pcfg.model, pcfg.device)[0])[1]
        shots = f"{pcfg.k}-shot {pcfg.selection}" if pcfg.k else "zero-shot"
        calibrated = f", calibrated ({pcfg.calibration})" if pcfg.calibration != "none" else ""
        self.name = f"prompt {cfg.config} ({pcfg.model}, {shots}{calibrated})"

    def label_distribution(self, examples: list[Any]) -> np.ndarray:
        return self.scorer(examples)


def build_teacher(config: Any) -> Teacher:
    return TEACHERS.get(config.type).impl(config)
