"""Best-model checkpoints: the trainable tensors only, as safetensors, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmadapt.io import atomic_path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone(): tied weights share storage, which safetensors refuses to write twice.
    return {
        n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(trainable_state(model), str(tmp))


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise RuntimeError(f"checkpoint {path} has tensors the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
