"""Sentence embeddings with an encoder (default: the embedded all-MiniLM-L6-v2) and embedding
zero-shot classification.

Pooling follows the model's sentence-transformers config (`1_Pooling/config.json`: MiniLM uses
mean pooling over the last hidden state, masked by attention); vectors are then L2-normalised
(MiniLM's modules.json ends with Normalize), so a dot product is the cosine similarity.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmadapt.models import load_model, load_tokenizer, resolve_model
from lmadapt.registry import Registry

POOLINGS: Registry = Registry("pooling")


@POOLINGS.register("mean", summary="mean of token states, padding excluded")
def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@POOLINGS.register("cls", summary="the first token's state")
def _cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


@POOLINGS.register("max", summary="element-wise max over tokens, padding excluded")
def _max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~mask[..., None].bool(), float("-inf")).max(1).values


_ST_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def pooling_mode(model_dir: str) -> str:
    """The pooling named in the sentence-transformers config, mean when there is none."""
    cfg = Path(model_dir) / "1_Pooling" / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        for key, mode in _ST_MODES.items():
            if data.get(key):
                return mode
    return "mean"


class Embedder:
    """Batched, normalised sentence embeddings from an encoder model."""

    def __init__(
        self,
        model: str = "minilm",
        batch_size: int = 64,
        max_length: int = 128,
        device: torch.device | str = "cpu",
    ):
        from transformers import AutoModel

        spec = resolve_model(model)
        self.tokenizer = load_tokenizer(spec)
        self.model = load_model(spec, AutoModel).to(device).eval()
        self.device = torch.device(device)
        self.pool = POOLINGS.get(pooling_mode(spec.path)).impl
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> np.ndarray:
        """(N, D) unit vectors."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = enc.to(self.device)
            hidden = self.model(**enc).last_hidden_state
            vec = torch.nn.functional.normalize(self.pool(hidden, enc["attention_mask"]), dim=-1)
            out[idx] = vec.float().cpu().numpy()
        return out


def zero_shot_scores(embedder: Any, texts: list[str], descriptions: list[list[str]]) -> np.ndarray:
    """(N, C) cosine similarity of each text to each label (mean over its descriptions)."""
    flat = [d for ds in descriptions for d in ds]
    owner = np.repeat(np.arange(len(descriptions)), [len(ds) for ds in descriptions])
    sims = embedder(texts) @ embedder(flat).T  # unit vectors: dot = cosine
    return np.stack([sims[:, owner == c].mean(1) for c in range(len(descriptions))], 1)
