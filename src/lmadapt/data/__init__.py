"""Data: read files into records, validate, tokenize, batch."""

from lmadapt.data.batching import Collator, length_grouped_batches, sequential_batches
from lmadapt.data.readers import Record, read_records

__all__ = ["Collator", "Record", "length_grouped_batches", "read_records", "sequential_batches"]
