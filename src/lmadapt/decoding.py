"""How to decode (`GenerationSettings`): checked in one place, for task configs, CLI flags and
server requests alike. Its own light module, below the tasks and the inference code that use it,
so that a run config is checked without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmadapt.errors import ConfigError


@dataclass
class GenerationSettings:
    """How to decode; defaults come from the task config, callers override per request."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    num_beams: int = 1
    """Beam search over this many beams (1 = greedy or sampling); the best beam is returned."""

    def __post_init__(self) -> None:
        """The one place decoding values are checked (task config, CLI flags, requests)."""
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError("num_beams", f"must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
