"""Server limits, importable without FastAPI so the CLI can offer them as flags."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from typing import Any

from lmadapt.errors import ConfigError, LmadaptError

BODY_BYTES_PER_CHAR = 6
"""A JSON-escaped character (\\uXXXX) takes 6 bytes: the default body limit must admit
max_texts texts of max_chars such characters."""
BODY_OVERHEAD = 64 * 1024
"""Room for the rest of a request (field names, model name, decoding settings)."""


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
    max_body_bytes: int | None = None
    """Largest request body, refused (413) before it is parsed; None: enough for max_texts texts
    of max_chars JSON-escaped characters plus 64 KiB (3.9 MB with the defaults)."""
    api_key: str | None = field(default=None, repr=False)
    """Key every request must send as `Authorization: Bearer KEY`; None: no check. Kept out of
    repr so that logging the settings never logs the key."""
    allow_no_auth: bool = False
    """Serve on a non-loopback host without an API key (see `check_exposure`)."""
    device: str = "auto"
    """Where the models run: auto | cpu | cuda | cuda:N | mps (session.resolve_device)."""
    memory_budget_mb: float | None = None
    """With --runs-dir: the most megabytes of weights kept in memory (least recently used runs
    are unloaded to stay under it); None: half of the memory available at start-up."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host names a request may name besides loopback and --host (see `host_names`), e.g. the
    name a reverse proxy forwards."""

    @classmethod
    def from_flags(cls, flags: Any, **given: Any) -> ServeSettings:
        """The settings a command line gave: each field its flag of the same name where the
        command has one (serve has all, ui a few), else the default; `given` wins."""
        own = {f.name: getattr(flags, f.name) for f in fields(cls) if hasattr(flags, f.name)}
        return cls(**{**own, **given})

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_texts",
            "max_chars",
            "max_new_tokens",
            "max_queue",
            "max_body_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(flag, f"must be >= 1, got {value}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise ConfigError("--memory-budget-mb", f"must be > 0, got {self.memory_budget_mb}")
        if self.max_wait_ms < 0:
            raise ConfigError("--max-wait-ms", f"must be >= 0, got {self.max_wait_ms}")
        key = self.api_key
        if key is not None and not (
            key and key == key.strip() and key.isascii() and key.isprintable()
        ):
            # what an HTTP header carries intact; the key itself stays out of the message
            raise ConfigError("--api-key", "must be printable ASCII without surrounding spaces")
        for name in self.allowed_hosts:
            if host_name(name) is None:
                raise ConfigError(
                    "--allowed-host", f"{name[:64]!r} is not a host name or IP address"
                )

    @property
    def host_names(self) -> frozenset[str]:
        """The names a request's Host header may give without an API key: loopback, --host
        and --allowed-host. A browser page whose own name was re-pointed at this address (DNS
        rebinding) sends that name, and is refused."""
        names = (*LOOPBACK_NAMES, self.host, *self.allowed_hosts)
        return frozenset(n for n in map(host_name, names) if n is not None)

    def memory_budget(self) -> int:
        """memory_budget_mb in bytes, or half of the RAM available now."""
        if self.memory_budget_mb is not None:
            return int(self.memory_budget_mb * 2**20)
        import psutil

        return psutil.virtual_memory().available // 2

    @property
    def body_limit(self) -> int:
        """max_body_bytes, or the default derived from max_texts and max_chars."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_PER_CHAR * self.max_texts * self.max_chars + BODY_OVERHEAD

    def check_exposure(self) -> None:
        """Refuse to bind anything but a loopback address without an API key: the endpoints
        would then answer (and spend CPU for) whoever can reach the port."""
        if self.api_key is None and not self.allow_no_auth and not is_loopback(self.host):
            raise LmadaptError(
                f"--host {self.host} is reachable from other machines: set an API key "
                "(LMADAPT_API_KEY or --api-key) or pass --allow-no-auth"
            )


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# [v6]:port, name:port or a bare v6 address; the port is not checked
_HOST = re.compile(
    r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+|[0-9a-f:.]+))(?::[0-9]{1,5})?"
)


def host_name(value: str) -> str | None:
    """The host of a Host header or a host argument (`name`, `name:port`, `[v6]:port`, `v6`),
    lower case and without a trailing dot; None for anything else (userinfo, paths, spaces)."""
    m = _HOST.fullmatch(value.strip().lower())
    if m is None:
        return None
    if m["v6"] is not None or ":" in (m["name"] or ""):
        try:
            return str(ipaddress.IPv6Address(m["v6"] or m["name"]))
        except ValueError:
            return None
    return m["name"].rstrip(".") or None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; any other name or address may be reachable from outside."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
