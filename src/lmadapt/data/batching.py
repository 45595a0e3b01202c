"""Batching: dynamic padding and length-grouped (shuffled-bucket) batch order."""

from __future__ import annotations

import random
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmadapt.data.cache import FeatureStore


class Batches(Sequence):
    """An epoch's batches as index lists, held as one int32 array of example indices in batch
    order (4 bytes an example) rather than as lists of Python ints (about 36), so that millions
    of examples cost megabytes; `batches[i]` is batch i's indices."""

    def __init__(self, order: np.ndarray, starts: np.ndarray, sequence: np.ndarray):
        self.order, self.starts, self.sequence = order, starts, sequence
        """Indices chunked into batches at `starts` (with the end); batch i is `sequence[i]`."""

    def __len__(self) -> int:
        return len(self.sequence)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        k = self.sequence[i]
        return self.order[self.starts[k] : self.starts[k + 1]].tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # unhashable: mutable arrays inside


def _order(n: int, rng: random.Random) -> np.ndarray:
    """range(n) shuffled by `rng`: the very permutation `rng.shuffle(list(range(n)))` gives,
    held as 4-byte ints (array.array, shared with numpy) instead of 36-byte Python ints."""
    order = array("i" if n < 2**31 else "q", range(n))
    rng.shuffle(order)
    return np.frombuffer(order, dtype=np.int32 if order.typecode == "i" else np.int64)


def length_grouped_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, bucket_batches: int = 50
) -> Batches:
    """Shuffle, sort by length inside mega-buckets of `bucket_batches` batches, shuffle batches,
    then move the batch holding the longest example to the front.

    Batches hold similar lengths (little padding) while their order stays random, the scheme of
    HF's LengthGroupedSampler; deterministic for a given seed. The longest batch goes first, as
    HF's does, so that a run's memory peaks at step 1: a run that would run out of memory fails
    there rather than hours in, and the peak does not depend on when a long batch comes up.
    Reads only `lengths` (a stored feature cache's memory-mapped array serves), one mega-bucket
    at a time.
    """
    rng = random.Random(seed)
    lengths = np.asarray(lengths)
    order = _order(len(lengths), rng)
    mega = batch_size * bucket_batches
    starts = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        # longest first; stable, so equal lengths keep their shuffled order
        chunk[:] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        starts.append(np.arange(start, start + len(chunk), batch_size))
    bounds = np.append(np.concatenate(starts) if starts else np.zeros(0, np.int64), len(order))
    shuffled = array("q", range(len(bounds) - 1))
    rng.shuffle(shuffled)
    sequence = np.frombuffer(shuffled, dtype=np.int64)  # shares (and may swap) its memory
    if len(order):
        position = int(np.flatnonzero(order == int(np.argmax(lengths)))[0])
        longest = int(np.searchsorted(bounds, position, side="right")) - 1
        first = int(np.flatnonzero(sequence == longest)[0])
        sequence[[0, first]] = sequence[[first, 0]]
    return Batches(order, bounds, sequence)


def shuffled_batches(n: int, batch_size: int, seed: int) -> Batches:
    order = _order(n, random.Random(seed))
    bounds = np.append(np.arange(0, n, batch_size), n)
    return Batches(order, bounds, np.arange(len(bounds) - 1))


def feature_lengths(features: Sequence[dict[str, Any]]) -> np.ndarray:
    """Each feature's input_ids length: a feature store's stored array (no feature read), or
    counted from the features in memory."""
    if isinstance(features, FeatureStore):
        return features.lengths
    return np.fromiter((len(f["input_ids"]) for f in features), np.int32, len(features))


def largest_batch(features: Sequence[dict[str, Any]], collate: Any, rows: int) -> Any:
    """The `rows` longest features, collated: the training batch that needs the most memory."""
    order = np.argsort(feature_lengths(features), kind="stable")[::-1][:rows]
    return collate([features[int(j)] for j in order])


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
    (sequence-level labels) are stacked as they are. `token_keys` maps each to its pad value; a
    float pad value gives a float tensor (loss weights), an int one a long tensor.
    """

    def __init__(self, pad_id: int, token_keys: Mapping[str, float] | None = None):
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
