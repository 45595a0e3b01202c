"""Choosing k demonstrations for in-context learning, seeded.

random: k examples drawn uniformly (one set per seed, shared by all queries: Brown et al. 2020);
balanced: k examples spread evenly over the labels, so the prompt has no majority label (Zhao et
al. 2021 show majority-label bias); knn: for each query, the k pool examples nearest to it in
sentence-embedding space (Liu et al. 2021, KATE, arXiv:2101.06804), nearest placed last, next to
the query.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from lmadapt.registry import Registry

Selection = list[list[int]]
"""Per query, indices into the pool; one shared list means every query sees the same demos."""

SELECTORS: Registry = Registry("demo selection")


def _key(ex: Any) -> str:
    return ex.text if ex.text_pair is None else f"{ex.text}\n{ex.text_pair}"


@SELECTORS.register("random", summary="k uniform draws, shared by all queries")
def select_random(pool: list[Any], queries: list[Any], k: int, seed: int, embed: Any) -> Selection:
    rng = random.Random(seed)
    return [rng.sample(range(len(pool)), min(k, len(pool)))]


@SELECTORS.register("balanced", summary="k draws spread evenly over labels, shuffled")
def select_balanced(
    pool: list[Any], queries: list[Any], k: int, seed: int, embed: Any
) -> Selection:
    rng = random.Random(seed)
    by_label: dict[Any, list[int]] = {}
    for i, ex in enumerate(pool):
        by_label.setdefault(ex.label, []).append(i)
    labels = sorted(by_label)
    rng.shuffle(labels)  # which labels get the remainder when k % C != 0
    picked: list[int] = []
    for r in range(k):
        bucket = [i for i in by_label[labels[r % len(labels)]] if i not in picked]
        if bucket:
            picked.append(rng.choice(bucket))
    rng.shuffle(picked)
    return [picked]


@SELECTORS.register("knn", summary="per query, the k nearest pool examples (nearest last)")
def select_knn(
    pool: list[Any], queries: list[Any], k: int, seed: int, embed: Callable[[list[str]], np.ndarray]
) -> Selection:
    return nearest(embed([_key(e) for e in pool]), embed([_key(q) for q in queries]), k)


def nearest(pool_vecs: np.ndarray, query_vecs: np.ndarray, k: int) -> Selection:
    """Indices of the k most cosine-similar pool rows per query, most similar last."""
    sims = query_vecs @ pool_vecs.T
    k = min(k, pool_vecs.shape[0])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [row[::-1].tolist() for row in top]


def sample_pool(train: list[Any], size: int | None, seed: int) -> list[Any]:
    """The candidate demonstrations of one seed: `size` training examples, or all of them."""
    if size is None or size >= len(train):
        return list(train)
    return random.Random(seed).sample(train, size)
