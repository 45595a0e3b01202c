"""This CPU's matmul throughput (fp32 and bf16): the ceiling for model-FLOPs utilisation."""

from __future__ import annotations

import time

import torch


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of an n x n x n matmul in `dtype` with the process's torch threads."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b  # warm-up: kernel selection, caches
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    elapsed = time.perf_counter() - start
    return 2 * n**3 * reps / elapsed


def machine_info() -> dict[str, float | int | str]:
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fp32_gflops": round(matmul_flops(torch.float32) / 1e9, 1),
        "bf16_gflops": round(matmul_flops(torch.bfloat16) / 1e9, 1),
    }


if __name__ == "__main__":
    print(machine_info())
