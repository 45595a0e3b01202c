"""What prompting runs read: the frozen models (loaded once per process), the prompt-
classification task of each template (its reader, renderer and verbalizer), and each seed's
demonstrations."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmadapt.errors import ConfigError
from lmadapt.prompting.config import PromptConfig
from lmadapt.prompting.demos import SELECTORS, sample_pool
from lmadapt.prompting.templates import template_verbalizer
from lmadapt.prompting.verbalizers import Verbalizer
from lmadapt.session import resolve_device

if TYPE_CHECKING:
    from lmadapt.tasks.classification import Example
    from lmadapt.tasks.prompt_classification import PromptClassificationTask


@functools.cache
def load_lm(name: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """(causal LM on `device`, tokenizer), loaded once per process (SmolLM2 from GGUF takes
    5-20 s). The device is resolved first, so a missing GPU is refused before anything loads."""
    from transformers import AutoModelForCausalLM

    from lmadapt.models import load_model, load_tokenizer, resolve_model

    where = resolve_device(device)
    spec = resolve_model(name)
    if spec.kind != "causal":
        raise ConfigError("model", f"{name} is a {spec.kind} model; this mode needs a causal LM")
    return load_model(spec, AutoModelForCausalLM).to(where).eval(), load_tokenizer(spec)


@functools.cache
def load_embedder(name: str, device: str = "cpu") -> Any:
    from lmadapt.prompting.embedding import Embedder

    return Embedder(name, device=resolve_device(device))


class CachedEmbed:
    """Embeds texts once per process run (queries are re-embedded by every kNN seed otherwise)."""

    def __init__(self, embedder: Any):
        self.embedder = embedder
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if todo:
            self.cache.update(zip(todo, self.embedder(todo)))
        return np.stack([self.cache[t] for t in texts])


def prompt_tasks(
    cfg: PromptConfig, verbalizer: dict[str, Any] | None = None, where: str = "verbalizer"
) -> list[PromptClassificationTask]:
    """The prompt-classification task of each template (one, or an ensemble's members): the
    `prompt` command reads, renders, scores and evaluates through the task a training run uses.
    `verbalizer` (the config field `where`) replaces the config's: embedding mode's label
    descriptions, a bench's words."""
    from lmadapt.tasks.prompt_classification import (
        PromptClassificationConfig,
        PromptClassificationTask,
    )

    raw = verbalizer or cfg.verbalizer
    if raw is None and isinstance(cfg.templates[0], str):  # an ensemble shares its first's
        raw = template_verbalizer(cfg.templates[0])
    if raw is None:
        raise ConfigError("verbalizer", "is required (the template suggests none)")
    Verbalizer.from_config(raw, where if verbalizer else "verbalizer")  # errors name the field
    return [
        PromptClassificationTask(
            PromptClassificationConfig(
                template=template,
                verbalizer=raw,
                text_column=cfg.data.text_column,
                text_pair_column=cfg.data.text_pair_column,
                label_column=cfg.data.label_column,
                max_length=None,
                length_normalize=cfg.length_normalize,
            )
        )
        for template in cfg.templates
    ]


def read_labelled(
    cfg: PromptConfig, task: PromptClassificationTask
) -> tuple[list[Example], list[Example]]:
    """(dev, train) examples, every label checked against the verbalizer; train only when
    demonstrations are drawn from it."""
    dev = task.read(cfg.data.dev, cfg.data.format)[: cfg.data.max_eval_samples]
    train = task.read(cfg.data.train, cfg.data.format) if cfg.data.train and cfg.k else []
    return dev, train


def select_demos(
    cfg: PromptConfig, train: list[Any], dev: list[Any], seed: int
) -> tuple[list[Any], list[list[int]]]:
    """(pool, per-query indices into the pool) for one seed; [[]] when k == 0."""
    if not cfg.k:
        return [], [[]]
    pool = sample_pool(train, cfg.data.demo_pool, seed)
    embed = CachedEmbed(load_embedder(cfg.embedder, cfg.device)) if cfg.selection == "knn" else None
    return pool, SELECTORS.get(cfg.selection).impl(pool, dev, cfg.k, seed, embed)
