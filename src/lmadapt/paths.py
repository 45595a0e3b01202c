"""Paths named by a request, resolved under a root: the one place that decides what the
dashboard (and anything else serving files to a browser) may open.

A name is refused when it holds a NUL byte, is too long for the filesystem, loops, leads
outside the root once every symlink is resolved, or names something other than what was asked
for: a directory, or a regular file (never a FIFO, socket or device: opening a FIFO blocks
until something writes to it). `open_inside` checks the opened file again, so a file swapped
for a link or a FIFO between the check and the open is refused as well.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Literal

SHOWN = 64
"""Longest part of a refused name quoted in the refusal."""


class RefusedPath(ValueError):
    """A name from a request that leads to no regular file (or directory) under the root."""


def _refuse(parts: tuple[str, ...], why: str) -> RefusedPath:
    name = "/".join(parts)
    shown = name if len(name) <= SHOWN else name[: SHOWN - 3] + "..."
    return RefusedPath(f"{shown!r}: {why}")


def inside(root: str | os.PathLike, *parts: str, kind: Literal["file", "dir"] = "file") -> Path:
    """The path `parts` name under `root`, every symlink resolved; RefusedPath unless it exists
    inside `root` (or is `root`) and is a regular file (kind="file") or a directory."""
    if any("\x00" in p for p in parts):
        raise _refuse(parts, "holds a NUL byte")
    base = Path(root).resolve()
    try:
        # strict: a missing, looping or over-long name is an error here, not a guess
        path = base.joinpath(*parts).resolve(strict=True)
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            why = (e.strerror or "cannot be read").lower()
        else:
            why = "symlink loop"
        raise _refuse(parts, why) from None
    if path != base and base not in path.parents:
        raise _refuse(parts, "leads outside the root")
    if not (stat.S_ISDIR(mode) if kind == "dir" else stat.S_ISREG(mode)):
        raise _refuse(parts, "not a directory" if kind == "dir" else "not a regular file")
    return path


NO_WAIT = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
"""Open flags: a FIFO swapped in after the check opens at once instead of blocking (and is then
refused), and a last component swapped for a symlink fails to open."""


def open_inside(root: str | os.PathLike, *parts: str) -> BinaryIO:
    """The regular file `parts` name under `root`, open for reading in binary (its `name` is the
    resolved path); RefusedPath as `inside` says."""
    path = inside(root, *parts)
    try:
        f = open(path, "rb", opener=lambda p, _: os.open(p, NO_WAIT))  # noqa: SIM115 (returned)
    except OSError as e:
        raise _refuse(parts, (e.strerror or "cannot be opened").lower()) from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise _refuse(parts, "not a regular file")
    return f
