"""What one training step keeps for its backward pass, counted instead of modelled.

The task's own step (its batch preparation, forward arguments, the model's forward and the
loss) runs on the meta device over the run's largest batch: shapes and dtypes only, no data
read and no arithmetic, so a 7B model is traced in seconds without a byte allocated. Saved-tensor
hooks (the ones activation checkpointing is built on) see every tensor autograd keeps; each
storage counts once, the parameters not at all. What differs between models, methods, attention
kernels, heads and losses is then measured on the model itself rather than read from a formula
for one architecture: LoRA keeps its inputs, eager attention its score matrices, a causal LM's
loss its log-probabilities only where the loss reads them.

Hand-written: no library counts the saved activations of a step without running it (torch's
memory profiler and `torch.cuda.max_memory_allocated` need the real step on a real device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from lmadapt.inference import model_inputs

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task

BF16_FUNCTIONS = {
    F.linear,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.mm,
    torch.baddbmm,
    torch.addmm,
    torch.einsum,
}
"""The functions bf16 autocast runs in bf16 on the CPU (its lower-precision list)."""
FP32_FUNCTIONS = {
    F.cross_entropy,
    F.nll_loss,
    F.kl_div,
    F.mse_loss,
    F.binary_cross_entropy_with_logits,
}
"""Losses bf16 autocast runs in fp32."""


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash attention, on the CPU and on CUDA) keeps for its
    backward: query, key, value, mask, output and the rows' log-sum-exp, never the score
    matrices. On the meta device `scaled_dot_product_attention` runs its unfused fallback,
    which keeps them; this stands in for the kernel the real step runs."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *mask: Any) -> Any:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *[m for m in mask if m is not None])
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # never run: the trace stops before backward
        raise NotImplementedError


class MetaStep(TorchFunctionMode):
    """The real step's kernels and autocast on the meta device, where `torch.autocast` does
    nothing (it acts on CPU and CUDA tensors only) and attention has no fused kernel. With
    `bf16`, matmul-like functions take bf16 inputs and losses fp32 ones, so the step saves the
    tensors and weight copies a bf16-autocast step saves. A torch-function mode sits above
    autograd, as autocast does, so the casts are part of the recorded graph."""

    def __init__(self, bf16: bool):
        super().__init__()
        self.bf16 = bf16
        self.made: dict[int, int] = {}
        """Storage -> bytes of every tensor the step's functions returned."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.bf16 and (func in BF16_FUNCTIONS or func in FP32_FUNCTIONS):
            to = torch.bfloat16 if func in BF16_FUNCTIONS else torch.float32
            frm = torch.float32 if to == torch.bfloat16 else torch.bfloat16

            def cast(x: Any) -> Any:
                return x.to(to) if isinstance(x, torch.Tensor) and x.dtype == frm else x

            args, kwargs = tree_map(cast, (args, kwargs))
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            q, k, v, mask = (
                args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)
            )
            out = FusedAttention.apply(q, k, v, mask)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.made.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return out


@dataclass(frozen=True)
class Saved:
    """Bytes one step keeps for backward over `rows` batch rows, split by where they are kept."""

    rows: int
    outside: int
    """Outside the transformer blocks: embeddings, head, loss."""
    blocks: int
    """Inside all the blocks."""
    largest_block: int
    """The most one block keeps: what a checkpointed block holds again during its recompute."""
    block_inputs: int
    """Each block's input: all a checkpointed block keeps between forward and backward."""
    largest: int
    """The largest single tensor kept."""
    retained: int = 0
    """What the host's allocator keeps of the step's freed memory (`HOST_RETAINED`); 0 on a GPU."""

    def kept(self, rows: int, checkpointing: bool) -> int:
        """Bytes held at the step's peak at `rows` rows (activations grow with the batch,
        linearly): what the forward keeps, plus the backward's working set at the largest kept
        tensor (its gradient and its input's, e.g. a language model's log-probabilities), plus
        what the host's allocator retains. Checkpointing keeps each block's input and holds one
        block's activations again while it recomputes it. Against measured peaks:
        bench/results/memory_estimate.md."""
        inside = self.block_inputs + self.largest_block if checkpointing else self.blocks
        working = 2 * self.largest
        return int((self.outside + inside + working + self.retained) * rows / self.rows)


HEAP_SIZED = 32 * 2**20
"""glibc's largest mmap threshold: a block under it comes from (and goes back to) the heap."""
HOST_RETAINED = 0.22
"""The share of the heap-sized tensors a step makes that glibc's heap still holds at the step's
peak: freed, in pieces it neither reuses nor returns until `malloc_trim` (a SmolLM2-135M LoRA
step at 8 x 468 tokens: 4.5 GB alive after the loss, 1.7 GB more retained). Set from the SmolLM2
rows of a first `python -m bench.memory_estimate` (1.7-2.2 GB retained of the 7.7 GB of such
tensors a step makes); bench/results/memory_estimate.md checks it on every row. A fixed 1 MB mmap
threshold (MALLOC_MMAP_THRESHOLD_) retains nothing but trained 29 % (MiniLM) to 40 % (SmolLM2)
slower, so the allocator stays as it is and the estimate counts what it keeps."""


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules gradient checkpointing wraps: transformers' decoder and encoder layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _meta(x: Any) -> Any:
    return x.to("meta") if isinstance(x, torch.Tensor) else x


class _Recorder:
    """The saved-tensor hook: each storage once, parameters out, with the block it was kept in
    (None outside the blocks), and each block's input (what checkpointing keeps of it)."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.blocks = _blocks(model)
        self.where: int | None = None
        self.saved: dict[int, tuple[int, int | None]] = {}
        self.inputs = [0] * len(self.blocks)
        self.handles = [
            b.register_forward_pre_hook(self._enter(i), with_kwargs=True)
            for i, b in enumerate(self.blocks)
        ]
        self.handles += [b.register_forward_hook(self._leave) for b in self.blocks]

    def _enter(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, kw: Any) -> None:
            self.where = i
            x = args[0] if args else next(iter(kw.values()), None)
            if isinstance(x, torch.Tensor):
                self.inputs[i] = x.numel() * x.element_size()

        return hook

    def _leave(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        self.where = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.params and key not in self.saved:
            self.saved[key] = (t.untyped_storage().nbytes(), self.where)
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self, rows: int, made: dict[int, int], host: bool) -> Saved:
        per_block = [0] * len(self.blocks)
        outside = 0
        for size, block in self.saved.values():
            if block is None:
                outside += size
            else:
                per_block[block] += size
        heap = sum(n for k, n in made.items() if k not in self.params and n < HEAP_SIZED)
        return Saved(
            rows=rows,
            outside=outside,
            blocks=sum(per_block),
            largest_block=max(per_block, default=0),
            block_inputs=sum(self.inputs),
            largest=max((s for s, _ in self.saved.values()), default=0),
            retained=int(HOST_RETAINED * heap) if host else 0,
        )


def _meta_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`batch` on the meta device, its padding mask as the 4D additive mask transformers would
    build from it (it reads a 2D mask's values; a 4D one it takes as it is), in the weights'
    dtype, which promotes eager attention's scores as in the real step."""
    meta = {k: _meta(v) for k, v in batch.items()}
    if "attention_mask" in meta:
        rows, width = meta["attention_mask"].shape
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
        meta["attention_mask"] = torch.zeros(rows, 1, width, width, dtype=dtype, device="meta")
    return meta


def trace_step(
    model: torch.nn.Module,
    task: Task,
    batch: dict[str, torch.Tensor],
    bf16: bool,
    prepare_batch: Any = None,
    host: bool = False,
) -> Saved:
    """Count what `model` (on the meta device) keeps for backward in the training step of `task`
    on `batch` (real tensors on the host): the loop's step, on meta copies of the batch.

    The forward arguments are read on the real batch (they may look at the data, e.g. which
    positions the loss reads). A loss that must look at the data on the way (a data-dependent
    shape) counts its input once more instead: the fp32 log-probabilities a cross-entropy
    keeps. `host`: the step runs on the CPU, whose allocator keeps part of what the step frees
    (`HOST_RETAINED`).
    """
    kwargs = {k: _meta(v) for k, v in task.forward_kwargs(model, batch).items()}
    meta = _meta_batch(model, batch)
    recorder = _Recorder(model)
    was_training = model.training
    model.train()
    meta_step = MetaStep(bf16)
    try:
        with meta_step, torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            if prepare_batch is not None:  # no gradients: nothing it makes is kept, so where it
                # selects positions of the data (nonzero), all may be taken
                # (`patch` is added to torch's config modules at import: mypy cannot see it)
                with fx_config.patch(meta_nonzero_assume_all_nonzero=True):  # type: ignore[attr-defined]
                    prepare_batch(model, meta)
            fwd = model_inputs(meta)  # (a packed batch's mask it leaves out: read as well)
            if "attention_mask" in meta:
                fwd["attention_mask"] = meta["attention_mask"]
            logits = task.logits(model(**fwd, **kwargs))
            recorder.pack(logits)  # the step holds its output until the backward is done
            try:
                task.loss(logits, meta)
            except (NotImplementedError, RuntimeError):  # a shape that depends on the data
                recorder.saved[-1] = (logits.numel() * 4, None)
    finally:
        recorder.close()
        model.train(was_training)
    return recorder.result(int(next(iter(batch.values())).shape[0]), meta_step.made, host)
