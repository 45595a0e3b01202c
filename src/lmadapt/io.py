"""Atomic file output: readers never see a half-written file (write to a temp path, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename. Stopped
    anywhere (Ctrl-C included), `path` is old or new and the temp file is gone."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:  # the user asked for `path`: the temp name means nothing to them
        raise _about(e, path) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _about(error: OSError, path: Path) -> OSError:
    """`error` as if it were about `path` (same errno and reason)."""
    return type(error)(error.errno, error.strerror or str(error), str(path))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` whole.

    The old `path` is first moved into the new directory (as `.NAME.old`, removed last), so
    wherever Ctrl-C lands `path` holds the old content or the new, and nothing stays beside it
    (the user's directory, for an output directory): at worst that hidden folder inside."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        stash = tmp / f".{path.name}.old"
        if path.exists():
            os.replace(path, stash)
        os.replace(tmp, path)
        shutil.rmtree(path / stash.name, ignore_errors=True)
    finally:
        if tmp is not None:
            stash = tmp / f".{path.name}.old"
            if stash.exists() and not path.exists():  # stopped between the two renames
                os.replace(stash, path)
            shutil.rmtree(tmp, ignore_errors=True)


def clean_orphans(directory: str | os.PathLike) -> list[Path]:
    """Remove the temp files and directories that the atomic writers above leave behind when a
    process dies mid-write (`.NAME.*.tmp`, `.NAME.old`); returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    orphans = [
        p
        for p in directory.iterdir()
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
    ]
    for p in orphans:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return orphans


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))
