"""Process-wide set-up that every command does the same way: torch threads, seeds, peak memory.

Every command that computes (train, continual, distill, prompt, generate, evaluate, serve)
starts here, so they agree on how many cores they use and how a seed makes a run repeatable.
"""

from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch


def set_threads(n: int | None = None) -> None:
    """torch intra-op threads: `n`, or every core of the machine."""
    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(threads: int | None, seed: int) -> None:
    """What a command does before reading data or building a model."""
    set_threads(threads)
    seed_everything(seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
