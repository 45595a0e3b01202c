"""Several processes on one training run: launcher detection, process group, model wrapping.

torchrun and `accelerate launch` start one process per device and tell each its place in the job
through WORLD_SIZE / RANK / LOCAL_RANK. Without them (or with WORLD_SIZE=1) the run is the plain
single-process one: no process group, no wrapper, the model trains on the device the run config
resolved (`device`, see session.resolve_device) and comes back to the CPU when training ends.

With several processes every one builds the same global batch order; each trains on a disjoint
slice of every global batch and the engine (DDP, or FSDP on CUDA GPUs) averages the gradients, so
`train.batch_size` is the global batch whatever the number of processes. Process 0 alone writes
the run directory.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist

from lmadapt.errors import ConfigError
from lmadapt.train.checkpoint import load_tensors, trainable_state

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; the default is the plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    strategy: str = "none"
    """Key of STRATEGIES: how the model is spread over the processes."""
    device: torch.device = CPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Process 0 writes artifacts, logs and checkpoints and shows progress."""
        return self.rank == 0

    @property
    def cpu_threads(self) -> int:
        """Default torch threads: the node's cores shared out among its processes."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)

    def shard(self, batch: list[int]) -> tuple[list[int], float]:
        """This process's rows of a global batch and their share of it.

        Strided, so length-sorted batches give every process similar lengths. A process left
        without rows (global batch smaller than the world) still runs the step, on one row with
        share 0, because the gradient average needs every process.
        """
        rows = batch[self.rank :: self.world_size]
        return (rows, len(rows) / len(batch)) if rows else (batch[:1], 0.0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Process 0's `obj`, on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64, so counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


SINGLE = Distributed()


def setup(choice: str, device: torch.device = CPU) -> Distributed:
    """Read the launcher's environment and join the process group (once per process).

    `choice` is `train.distributed`; it is checked here, not on load, because whether CUDA is
    present is a property of the machine the run starts on, not of the config file. `device` is
    where a single process trains; under a launcher each process takes its own local GPU.
    """
    if choice == "fsdp" and not torch.cuda.is_available():
        raise ConfigError(
            "train.distributed", "fsdp shards over CUDA GPUs and none is visible; use ddp"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return SINGLE if device == CPU else Distributed(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=60),  # others wait while process 0 evaluates
        )
        atexit.register(dist.destroy_process_group)
    return Distributed(
        rank=rank,
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=choice,
        device=device,
    )


# ---------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Strategy:
    wrap: Callable[[torch.nn.Module, Distributed], tuple[torch.nn.Module, torch.nn.Module]]
    """(model, ctx) -> (the model whose parameters train, the module the training step calls)."""
    unwrap: Callable[[torch.nn.Module, torch.nn.Module], None]
    """(trained, model): leave the trained weights in the caller's model, on the CPU."""
    no_sync: Callable[[torch.nn.Module], contextlib.AbstractContextManager]
    """Skip the gradient exchange for a backward pass (gradient accumulation)."""
    sharded: bool
    """Weights are split over the processes: forward passes and saving need every process."""


def _plain(model: torch.nn.Module, ctx: Distributed) -> tuple[torch.nn.Module, torch.nn.Module]:
    model.to(ctx.device)  # a no-op on the CPU
    return model, model


def _ddp(model: torch.nn.Module, ctx: Distributed) -> tuple[torch.nn.Module, torch.nn.Module]:
    model.to(ctx.device)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _to_cpu(trained: torch.nn.Module, model: torch.nn.Module) -> None:
    model.to(CPU)


def _fsdp(model: torch.nn.Module, ctx: Distributed) -> tuple[torch.nn.Module, torch.nn.Module]:
    """FSDP2: each transformer block (the model's `_no_split_modules`) is one shard unit.

    Sharding replaces the parameters in place, so a copy is sharded and the caller's model stays
    a plain CPU model that receives the trained weights at the end (`_gather`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    sharded = copy.deepcopy(model)
    blocks = {name for m in sharded.modules() for name in getattr(m, "_no_split_modules", ()) or ()}
    for module in [m for m in sharded.modules() if type(m).__name__ in blocks]:
        fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    return sharded, sharded


def _gather(trained: torch.nn.Module, model: torch.nn.Module) -> None:
    load_tensors(model, trainable_state(trained), "the sharded model")


def _ddp_no_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`model` is the DistributedDataParallel wrapper that `_ddp` returned."""
    return cast(torch.nn.parallel.DistributedDataParallel, model).no_sync()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(_plain, _to_cpu, lambda m: contextlib.nullcontext(), sharded=False),
    "ddp": Strategy(_ddp, _to_cpu, _ddp_no_sync, sharded=False),
    "fsdp": Strategy(_fsdp, _gather, _fsdp_no_sync, sharded=True),
}
