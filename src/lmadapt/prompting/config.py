"""Typed prompt-run configuration (`lmadapt prompt CONFIG.yaml key=value ...`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmadapt.errors import ConfigError
from lmadapt.prompting.calibration import CALIBRATIONS
from lmadapt.prompting.demos import SELECTORS
from lmadapt.schema import (
    apply_overrides,
    check_device_name,
    config_source,
    from_dict,
    read_yaml,
    resolve_data_paths,
)


@dataclass
class PromptDataConfig:
    dev: str
    """Evaluation file (csv, tsv, jsonl): the queries."""
    train: str | None = None
    """Pool of demonstrations; required when k > 0."""
    format: Literal["auto", "csv", "tsv", "jsonl", "json"] = "auto"
    text_column: str | None = None
    """None takes the first present of text, sentence, sentence1, question."""
    text_pair_column: str | None = None
    label_column: str = "label"
    target_column: str = "answer"
    """Generation mode: the reference answer column."""
    max_eval_samples: int | None = None
    """Keep the first N evaluation rows."""
    demo_pool: int | None = 2000
    """Candidate demonstrations per seed, sampled from train (None = all of train)."""

    def __post_init__(self) -> None:
        for name in ("max_eval_samples", "demo_pool"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"data.{name}", f"must be > 0, got {v}")


@dataclass
class PromptConfig:
    """One prompting run: a frozen model, a template, a verbalizer, k demonstrations."""

    data: PromptDataConfig
    mode: str = "verbalizer"
    """verbalizer (LM label scoring), embedding (encoder cosine zero-shot), generate (open)."""
    model: str = "smollm2-135m-instruct"
    template: Any = "sentiment"
    """A named template (see `lmadapt prompt --templates`), a YAML path, or an inline mapping; a
    list of them is an ensemble: each template is scored (and calibrated) on its own and the
    label log-probabilities are averaged (verbalizer mode)."""
    verbalizer: dict[str, Any] | None = None
    """label -> word or list of words; None takes the named template's."""
    label_descriptions: dict[str, Any] | None = None
    """Embedding mode: label -> description(s); None uses "{verbalizer word}"."""
    k: int = 0
    """Demonstrations per prompt."""
    selection: str = "random"
    """random, balanced or knn."""
    seeds: list[int] = field(default_factory=lambda: [0])
    calibration: bool | str = "none"
    """Also report calibrated scores beside the raw ones: none, contextual (content-free strings,
    Zhao et al. 2021) or domain (divide out the mean predicted distribution over the unlabelled
    evaluation inputs, Fei et al. 2023; no labels are read). true/false mean contextual/none."""
    length_normalize: bool = False
    """Divide each verbalizer's log-prob by its token count."""
    prefix_reuse: bool = True
    """Encode the shared prefix once and reuse its KV cache (off only for benchmarking)."""
    batch_size: int = 16
    max_new_tokens: int = 32
    """Generation mode: greedy decoding budget."""
    embedder: str = "minilm"
    """Encoder for kNN demonstrations and embedding mode."""
    threads: int | None = None
    device: str = "auto"
    """Where the models run: auto | cpu | cuda | cuda:N | mps (auto = a CUDA GPU when present)."""
    output_dir: str = "runs/prompt"
    overwrite: bool = False

    def __post_init__(self) -> None:
        # `mode` is checked against the modes registry by the runner: a config imports none
        if self.selection not in SELECTORS:
            raise ConfigError(
                "selection", f"unknown {self.selection!r}; one of: {', '.join(SELECTORS.names())}"
            )
        if self.k < 0:
            raise ConfigError("k", f"must be >= 0, got {self.k}")
        if self.k and not self.data.train:
            raise ConfigError("data.train", f"is required for k={self.k} demonstrations")
        if not self.seeds:
            raise ConfigError("seeds", "needs at least one seed")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        check_device_name(self.device)
        if isinstance(self.calibration, bool):  # the boolean spelling from before `domain`
            self.calibration = "contextual" if self.calibration else "none"
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                "calibration", f"unknown {self.calibration!r}; one of: {', '.join(CALIBRATIONS)}"
            )
        if self.calibration == "contextual" and self.mode == "embedding":
            raise ConfigError("calibration", "contextual needs mode verbalizer; embedding: domain")
        if not self.templates:
            raise ConfigError("template", "an ensemble needs at least one template")
        if len(self.templates) > 1 and self.mode != "verbalizer":
            raise ConfigError("template", f"an ensemble needs mode verbalizer, not {self.mode!r}")

    @property
    def templates(self) -> list[Any]:
        """The template specs: one, or the members of an ensemble."""
        return self.template if isinstance(self.template, list) else [self.template]

    @property
    def stochastic(self) -> bool:
        """Whether seeds change anything: demonstrations are sampled."""
        return self.k > 0


def load_prompt_config(
    path: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> PromptConfig:
    """Read a prompt YAML (or mapping), apply dotted overrides and check every field."""
    source = None
    if isinstance(path, dict):
        raw = path
    else:
        source = str(path)
        raw = read_yaml(path)
    with config_source(source) if source else contextlib.nullcontext():
        cfg = from_dict(PromptConfig, apply_overrides(raw, overrides or []))
    if source:
        resolve_data_paths(source, cfg.data, ("dev", "train"))
    return cfg
