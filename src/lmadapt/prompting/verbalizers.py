"""Verbalizers: each label maps to one or more words; a label's score is the model's
log-probability of continuing the prompt with its word (Schick & Schütze 2021, PET,
arXiv:2001.07676), not a parse of free generation, so every label gets a score and the argmax is
always a valid label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmadapt.errors import ConfigError


@dataclass
class Verbalizer:
    """Label names in order, and the words of each (several words pool their probability)."""

    labels: list[str]
    words: dict[str, list[str]]

    @classmethod
    def from_config(cls, raw: dict[str, Any], where: str = "verbalizer") -> Verbalizer:
        if not isinstance(raw, dict) or len(raw) < 2:
            raise ConfigError(where, f"needs a mapping of at least 2 labels to words, got {raw!r}")
        words: dict[str, list[str]] = {}
        for label, value in raw.items():
            items = [value] if isinstance(value, str) else value
            if (
                not isinstance(items, list)
                or not items
                or not all(isinstance(w, str) and w.strip() for w in items)
            ):
                raise ConfigError(
                    f"{where}.{label}", f"expected a word or a list of words, got {value!r}"
                )
            words[str(label)] = [w.strip() for w in items]
        return cls(list(words), words)

    def tokenize(self, tokenizer: Any, answer: Any) -> Continuations:
        """Token ids of every (label, word) continuation; `answer` maps a word to its text."""
        ids, owner = [], []
        for c, label in enumerate(self.labels):
            for word in self.words[label]:
                toks = tokenizer(answer(word), add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ConfigError(f"verbalizer.{label}", f"word {word!r} has no tokens")
                ids.append(list(toks))
                owner.append(c)
        return Continuations(ids, owner, len(self.labels))


@dataclass
class Continuations:
    ids: list[list[int]]
    """Token ids of each continuation j."""
    owner: list[int]
    """Label index of continuation j."""
    n_labels: int

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.ids], dtype=torch.float32)

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.ids)

    def label_scores(self, logprobs: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, J) summed continuation log-probs -> (N, C) label log-scores.

        With `normalize`, each continuation's log-prob is divided by its token count, so long
        words are not penalised for being long (length normalisation, Brown et al. 2020). A label
        with several words scores log Σ p(word): the probability of saying any of them.
        """
        if normalize:
            logprobs = logprobs / self.lengths.to(logprobs.device)
        member = torch.zeros(self.n_labels, len(self.ids), dtype=torch.bool)
        member[self.owner, torch.arange(len(self.ids))] = True
        masked = logprobs[:, None, :].masked_fill(~member.to(logprobs.device), float("-inf"))
        return torch.logsumexp(masked, dim=-1)
