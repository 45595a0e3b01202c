"""Batching: dynamic padding and length-grouped (shuffled-bucket) batch order."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, bucket_batches: int = 50
) -> list[list[int]]:
    """Shuffle, sort by length inside mega-buckets of `bucket_batches` batches, shuffle batches.

    Batches hold similar lengths (little padding) while their order stays random, the scheme of
    HF's LengthGroupedSampler; deterministic for a given seed.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def sequential_batches(
    lengths: Sequence[int], batch_size: int, sort: bool = True
) -> list[list[int]]:
    """Evaluation order: sorted by length (less padding); callers restore the original order."""
    order = (
        sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if sort
        else list(range(len(lengths)))
    )
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Collator:
    """Pad features to the longest in the batch (dynamic padding).

    `input_ids` and every key in `token_keys` are per-token lists padded to width T; other keys
    (sequence-level labels) are stacked as they are.
    """

    def __init__(self, pad_id: int, token_keys: dict[str, int] | None = None):
        self.pad_values = {"input_ids": pad_id, "token_type_ids": 0, **(token_keys or {})}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        mask = torch.zeros((len(features), width), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            mask[i, : len(f["input_ids"])] = 1
        batch["attention_mask"] = mask
        for key in features[0]:
            if key in self.pad_values:
                pad = self.pad_values[key]
                dtype = torch.float if isinstance(pad, float) else torch.long  # float: weights
                out = torch.full((len(features), width), pad, dtype=dtype)
                for i, f in enumerate(features):
                    out[i, : len(f[key])] = torch.tensor(f[key], dtype=dtype)
                batch[key] = out
            else:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


class Seq2SeqCollator:
    """Batches for encoder-decoder models: the padded input for the encoder, and the labels
    padded to their own width with the decoder's input beside them (the labels shifted right
    after the decoder's start token, as the model saw targets in pretraining). Unlabelled
    features get the start token alone, for the first decoding step."""

    def __init__(self, pad_id: int, decoder_start_id: int, ignore: int = -100):
        self.inner = Collator(pad_id)
        self.pad_id, self.start, self.ignore = pad_id, decoder_start_id, ignore

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner([{"input_ids": f["input_ids"]} for f in features])
        if "labels" not in features[0]:
            batch["decoder_input_ids"] = torch.full((len(features), 1), self.start)
            return batch
        width = max(len(f["labels"]) for f in features)
        labels = torch.full((len(features), width), self.ignore, dtype=torch.long)  # (B, T_dec)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        decoder = torch.cat([torch.full((len(features), 1), self.start), labels[:, :-1]], 1)
        batch["labels"] = labels
        batch["decoder_input_ids"] = decoder.masked_fill(decoder == self.ignore, self.pad_id)
        return batch


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Length-sorted batches of at most `budget` padded tokens (at least one example each)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class PackingCollator:
    """Packs a batch's examples into as few rows of `capacity` tokens as fit (first-fit
    decreasing). `position_ids` restart at 0 for each example, which is what makes transformers
    mask attention per example; the first token of every example carries no loss, so no
    example is trained to predict the start of the next one."""

    def __init__(self, pad_id: int, capacity: int):
        self.capacity = capacity
        self.inner = Collator(pad_id, {"labels": -100, "loss_weights": 0.0, "position_ids": 0})

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[dict[str, list]] = []
        for f in sorted(features, key=lambda f: -len(f["input_ids"])):
            n = len(f["input_ids"])
            row = next((r for r in rows if len(r["input_ids"]) + n <= self.capacity), None)
            if row is None:
                row = {"input_ids": [], "labels": [], "loss_weights": [], "position_ids": []}
                rows.append(row)
            for key in ("input_ids", "labels", "loss_weights"):
                row[key] += f[key]
            row["position_ids"] += list(range(n))
        return self.inner(rows)
