"""Streamed generation: tokens leave the batcher's worker thread for the event loop as text.

transformers' `AsyncTextIteratorStreamer` carries the text; `StopCutter` makes what is sent read
exactly like the non-streamed answer (cut at the first stop string, stripped), which means
holding back text that may still become a stop string or trailing whitespace.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import AsyncTextIteratorStreamer


class TokenStream(AsyncTextIteratorStreamer):
    """The generated text (no prompt, no special tokens) as an async iterator. Build it inside
    the event loop that reads it; a client that leaves sets its job's `cancelled` instead of
    reading on (see `runs.GenerationJob`)."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)


class StopCutter:
    """Feeds on streamed pieces; returns what may be sent so far. The concatenation of its
    returns equals the task's final answer: the text before the first stop string, stripped."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.raw = ""
        self.sent = 0
        self.done = False

    def feed(self, piece: str, final: bool = False) -> str:
        if self.done:
            return ""
        self.raw += piece
        cut = min((self.raw.find(s) for s in self.stops if s in self.raw), default=-1)
        if cut >= 0:
            text, self.done = self.raw[:cut], True
        elif final:
            text = self.raw
        else:  # hold back an ending that may grow into a stop string
            held = max(
                (k for s in self.stops for k in range(1, len(s)) if self.raw.endswith(s[:k])),
                default=0,
            )
            text = self.raw[: len(self.raw) - held]
        text = text.strip()
        delta, self.sent = text[self.sent :], len(text)
        return delta


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Event: `data: <json>` (or a literal such as [DONE]) and a blank line."""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"
