"""Frozen weights held in bf16 while a PEFT method trains (`train.base_dtype: bf16`).

The fp32 originals are kept to be put back when training ends, so that the saved artifact and
the final evaluation are the fp32 model's. transformers loads safetensors weights as views into
the memory-mapped files (private, writable mappings), so an original costs no allocation, but the
cast reads every page of it and those pages stayed resident: a Qwen2.5-0.5B-like run peaked at
1.47x HF Trainer's RSS with the same anonymous memory (bench/results/model_sizes.md). Once an
original is cast, the pages it maps from its file are dropped from the process
(`madvise(MADV_DONTNEED)`); putting the originals back reads them from the file again. Only pages
the process never wrote are dropped: on a private mapping, dropping a written page would bring
back the file's bytes in place of the process's (`/proc/self/pagemap` tells them apart). Linux
only; elsewhere, and for weights not mapped from a file, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Callable

import numpy as np
import torch

from lmadapt.inference import bf16_castable

MADV_DONTNEED = 4
FILE_PAGE, SWAPPED, PRESENT = 1 << 61, 1 << 62, 1 << 63
"""Bits of a /proc/self/pagemap entry (Documentation/admin-guide/mm/pagemap.rst)."""


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    # no library exposes madvise for a tensor's memory (Python's mmap.madvise needs the mmap
    # object, which transformers does not hand out), so libc's is called directly
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = ctypes.CDLL(name, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _only_file_pages(first: int, last: int) -> bool:
    """Whether every page from `first` to `last` the process holds is still the file's: none
    was written (a written page of a private mapping is anonymous memory)."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // page * 8)
            entries = np.frombuffer(f.read((last - first) // page * 8), dtype=np.uint64)
    except OSError:
        return False
    held = (entries & np.uint64(PRESENT | SWAPPED)) != 0
    return bool(np.all((entries[held] & np.uint64(FILE_PAGE)) != 0))


def release_file_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages under `tensor` from the process where they are unwritten pages of a
    mapped file (read again from the file on the next access); otherwise leave them."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor
    if last > first and _only_file_pages(first, last):
        madvise(first, last - first, MADV_DONTNEED)


def frozen_in_bf16(model: torch.nn.Module) -> Callable[[], None]:
    """Cast the frozen floating-point weights to bf16 (the trained ones stay fp32, as AdamW
    needs); returns a function that puts the original fp32 tensors back. The originals are kept
    where they are (on the CPU, before the model moves to a GPU), not copied, and the pages they
    map from a file dropped as each is cast."""
    frozen = bf16_castable(model)
    originals = [p.data for p in frozen]
    for p, original in zip(frozen, originals):
        p.data = original.to(torch.bfloat16)
        release_file_pages(original)

    def restore() -> None:
        for p, data in zip(frozen, originals):
            p.data = data

    return restore
