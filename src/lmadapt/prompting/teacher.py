"""Label distributions from a verbalizer prompt, for components that consume them (the
distillation teacher)."""

from __future__ import annotations

import numpy as np

from lmadapt.errors import ConfigError
from lmadapt.prompting.config import PromptConfig
from lmadapt.prompting.modes.classify import score_ensemble
from lmadapt.prompting.sources import prompt_tasks
from lmadapt.tasks.classification import Example


class LabelScorer:
    """Per-example label distributions of a verbalizer prompt config, for other components.

    The distillation teacher uses it: the prompt's first seed picks the demonstrations, and the
    calibrated distribution is returned when the config turns calibration on.
    """

    def __init__(self, cfg: PromptConfig):
        if cfg.mode != "verbalizer":
            raise ConfigError("mode", f"must be 'verbalizer' for label scores, not {cfg.mode!r}")
        self.cfg = cfg
        self.tasks = prompt_tasks(cfg)
        self.labels = self.tasks[0].labels
        self.train = (
            self.tasks[0].read(cfg.data.train, cfg.data.format) if cfg.data.train and cfg.k else []
        )

    def __call__(self, examples: list[Example]) -> np.ndarray:
        """(N, C) probabilities over `labels`; example labels are not looked at."""
        s = score_ensemble(self.cfg, self.tasks, examples, self.train, self.cfg.seeds[0])
        return s.calibrated if s.calibrated is not None else s.probs
