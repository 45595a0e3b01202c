"""Checkpoints as safetensors + JSON only (nothing pickled), each written atomically.

- `best.safetensors`: the trainable tensors of the best model so far.
- `step-N/`: everything needed to resume exactly: trainable tensors, AdamW moments, scheduler
  position, RNG states, data position and early-stopping state.

Tensors are always whole and keyed by the plain model's parameter names, whatever the number of
processes that trained them, so a checkpoint resumes under any number of processes. Weights
sharded over processes (FSDP) are gathered first: the save functions are then collective (every
process calls them; `write` is true on process 0 alone).
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
from torch.distributed.tensor import DTensor, distribute_tensor

from lmadapt.io import atomic_dir, atomic_path


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the full tensor (collective for a sharded DTensor)."""
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    # clone(): tied weights share storage, which safetensors refuses to write twice.
    return t.cpu().clone().contiguous()


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` laid out like `ref`: this process's shard when `ref` is sharded (every process has
    read the same file, so nothing is sent)."""
    if isinstance(ref, DTensor):
        return distribute_tensor(
            t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None
        )
    return t


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, path: Path, write: bool = True) -> None:
    state = trainable_state(model)
    if write:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))


def load_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    missing = set(state) - set(params)
    if missing:
        raise RuntimeError(f"{source} has tensors the model lacks: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(_like(tensor, params[name]))


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    load_tensors(model, load_file(str(path)), f"checkpoint {path}")


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{pid}.{key}"] = _whole(t)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's ids
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        param = params[int(pid)]
        if value.shape == param.shape:  # moments like the parameter; `step` stays a scalar
            value = _like(value, param)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def checkpoint_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step-{step:08d}"


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    write: bool = True,
) -> Path:
    """Write `ckpt_root/step-N` atomically, then drop all but the newest `keep`."""
    target = checkpoint_dir(ckpt_root, step)
    weights = trainable_state(model)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    if not write:
        return target
    with atomic_dir(target) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        np_state = np.random.get_state()
        assert isinstance(np_state, tuple)  # the global generator is MT19937: the legacy tuple
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
