"""Server limits, importable without FastAPI so the CLI can offer them as flags."""

from __future__ import annotations

from dataclasses import dataclass

from lmadapt.errors import ConfigError


@dataclass
class ServeSettings:
    """Server limits; each becomes a `lmadapt serve` flag of the same name."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    """Most texts in one forward pass (requests are collected until this many or max_wait_ms)."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    max_texts: int = 64
    """Most texts in one request."""
    max_chars: int = 10_000
    """Longest text in characters (longer inputs are refused, not truncated)."""
    max_new_tokens: int = 512
    """Largest max_new_tokens a generation request may ask for."""
    max_queue: int = 1024
    """Requests waiting per model beyond which the server answers 503."""

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_texts", "max_chars", "max_new_tokens", "max_queue"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(flag, f"must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError("--max-wait-ms", f"must be >= 0, got {self.max_wait_ms}")
