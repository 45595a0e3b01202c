"""Checkpoints as safetensors + JSON only (nothing pickled), each written atomically.

- `best.safetensors`: the trainable tensors of the best model so far.
- `step-N/`: everything needed to resume exactly: trainable tensors, AdamW moments, scheduler
  position, RNG states, data position and early-stopping state.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmadapt.io import atomic_dir, atomic_path


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
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise RuntimeError(f"checkpoint {path} has tensors the model lacks: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{key}"] = t.detach().clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `ckpt_root/step-N` atomically, then drop all but the newest `keep`."""
    target = ckpt_root / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        meta = {
            "step": step,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "trainer": trainer_state,
        }
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in sorted(ckpt_root.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNGs; return the trainer's saved state."""
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_trainable(model, path / "trainable.safetensors")
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    v, internal, gauss = meta["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return meta["trainer"]
