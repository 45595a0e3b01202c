"""This CPU: its matmul throughput (fp32, bf16, and int8 through the kernel `train.base_dtype:
int8` uses), the ceilings for model-FLOPs utilisation, and what it is (model, vector ISA, whether
it has bf16 units), so that every timed figure says which kind of CPU it came from."""

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


def int8_linear_flops(n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of fbgemm's dynamic-quantised linear (an n x n int8 weight, n rows of
    fp32 input quantised on each call), the frozen matmuls of `train.base_dtype: int8`."""
    from lmadapt.train.int8_base import REDUCE_RANGE, pack_int8

    x, packed = torch.randn(n, n), pack_int8(torch.randn(n, n))
    for _ in range(3):
        torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((ln for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def machine_info() -> dict[str, float | int | str | bool]:
    from lmadapt.inference import cpu_has_bf16

    return {
        "cpu": cpu_model(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "bf16_units": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fp32_gflops": round(matmul_flops(torch.float32) / 1e9, 1),
        "bf16_gflops": round(matmul_flops(torch.bfloat16) / 1e9, 1),
        "int8_gflops": round(int8_linear_flops() / 1e9, 1),
    }


if __name__ == "__main__":
    print(machine_info())
