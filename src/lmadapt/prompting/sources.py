"""What prompting runs read: the frozen models (loaded once per process), labelled examples
through the classification task's reader, the verbalizer, and each seed's demonstrations."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from lmadapt.errors import ConfigError
from lmadapt.prompting.config import PromptConfig
from lmadapt.prompting.demos import SELECTORS, sample_pool
from lmadapt.prompting.templates import template_verbalizer
from lmadapt.prompting.verbalizers import Verbalizer
from lmadapt.session import resolve_device


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


def fields_of(ex: Any) -> dict[str, Any]:
    return {"text": ex.text, "text_pair": ex.text_pair}


def resolve_verbalizer(cfg: PromptConfig) -> Verbalizer:
    raw = cfg.verbalizer
    if raw is None and isinstance(cfg.templates[0], str):  # an ensemble shares its first's
        raw = template_verbalizer(cfg.templates[0])
    if raw is None:
        raise ConfigError("verbalizer", "is required (the template suggests none)")
    return Verbalizer.from_config(raw)


def read_labelled_file(cfg: PromptConfig, path: str, labels: list[str]) -> list[Any]:
    """Examples through the classification task's reader; every label must have a verbalizer."""
    from lmadapt.tasks.classification import ClassificationConfig, ClassificationTask
    from lmadapt.tasks.prompt_classification import check_verbalized

    task = ClassificationTask(
        ClassificationConfig(
            text_column=cfg.data.text_column,
            text_pair_column=cfg.data.text_pair_column,
            label_column=cfg.data.label_column,
        )
    )
    return check_verbalized(task.read(path, cfg.data.format), labels, cfg.data.label_column)


def read_labelled(cfg: PromptConfig, labels: list[str]) -> tuple[list[Any], list[Any]]:
    """(dev, train) Examples; train only when demonstrations are drawn from it."""
    dev = read_labelled_file(cfg, cfg.data.dev, labels)[: cfg.data.max_eval_samples]
    train = read_labelled_file(cfg, cfg.data.train, labels) if cfg.data.train and cfg.k else []
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
