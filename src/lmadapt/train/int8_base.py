"""Frozen linear weights multiplied in int8 while a PEFT method trains on a CPU.

On a CPU without bf16 units a LoRA or BitFit step is bound by the fp32 matmuls of the frozen
base (forward, and the input gradient of the backward pass). fbgemm's dynamic-quantised linear
(int8 weights, one scale per output channel; fp32 input quantised on each call) runs those at
1.6-1.8x the fp32 rate on an AVX2 CPU (`python -m bench.machine`: int8_gflops against
fp32_gflops). torch's
quantised linear has no autograd, so the backward pass is written here: the input gradient is the
same kind of product with the transposed weight, packed once. Each row (token) is scaled to
[-1, 1] before fbgemm quantises the whole input with one scale, and scaled back after: tokens
whose activations or gradients are orders of magnitude apart keep their own precision. Only
training uses it: in eval mode (dev evaluation, prediction) the modules compute in fp32, so the
figures a run reports are those of the artifact it saves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

REDUCE_RANGE = True
"""7-bit activations: fbgemm's AVX2 int8 kernel (vpmaddubsw) saturates 16-bit sums otherwise."""


def pack_int8(weight: torch.Tensor) -> Any:
    """fbgemm's packed int8 form of `weight` (out x in), one scale per output row."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # torch flags its quantised-tensor constructors as legacy
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(
            w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
        )
        return torch.ops.quantized.linear_prepack(q, None)


def _row_scaled(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x @ W.T through fbgemm, each row of x quantised at its own scale."""
    # (abs().amax: 47 us on a 32 x 14 x 384 batch; vector_norm(inf): 333 us)
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)
    y = torch.ops.quantized.linear_dynamic((x / scale).contiguous(), packed, REDUCE_RANGE)
    return y.mul_(scale)


class _Int8Matmul(torch.autograd.Function):
    """x @ W.T in int8; the input gradient grad @ W in int8 too (no weight gradient: frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: Any, packed_t: Any) -> torch.Tensor:
        ctx.packed_t = packed_t
        return _row_scaled(x, packed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _row_scaled(grad, ctx.packed_t), None, None


def int8_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linears whose fp32 weight is frozen (a trained bias, as BitFit's, stays fp32)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and m.weight.dtype == torch.float32
        and not m.weight.requires_grad
    ]


def frozen_in_int8(model: torch.nn.Module) -> Callable[[], None]:
    """Route the training forward of every frozen linear through int8; returns the function
    that puts the plain forward back. The fp32 weights stay where they are (eval mode and the
    saved artifact use them)."""
    patched = int8_linears(model)
    for m in patched:
        packed, packed_t = pack_int8(m.weight), pack_int8(m.weight.t())

        def forward(
            x: torch.Tensor, m: torch.nn.Linear = m, p: Any = packed, pt: Any = packed_t
        ) -> torch.Tensor:
            if not m.training or x.dtype != torch.float32:
                return F.linear(x, m.weight, m.bias)
            y = _Int8Matmul.apply(x, p, pt)
            return y if m.bias is None else y + m.bias

        m.forward = forward  # type: ignore[method-assign,assignment]

    def restore() -> None:
        for m in patched:
            del m.forward

    return restore
