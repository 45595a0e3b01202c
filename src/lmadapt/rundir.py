"""Output directories: checked before anything is written, and replaced only when lmadapt made them.

Every directory lmadapt creates for a run (train, continual, distill, prompt, export) carries a
marker file. `overwrite=true` deletes an existing directory only when it holds that marker (or
is empty): never a directory the user made, whatever its name, and never the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmadapt.errors import ConfigError

MARKER = ".lmadapt-run"

# The files of a run directory, named once: every command writes them and every reader (predict,
# serve, the dashboard) finds them through these names or `RunDir`.
CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.json"
"""Written last by a finished run: its presence marks one."""
REPORT = "report.md"
LOG = "log.jsonl"
MODEL = "model"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
CONTINUAL = "continual.json"
"""A continual stream's summary, written last like METRICS."""
EVALUATIONS = "evaluations.json"
"""Per split: the evaluation's structured results (labels, per-class scores, confusion matrix),
which report.md renders as tables and the dashboard as plots."""


class RunDir:
    """The paths of one run directory's files (see the names above)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.run_info = self.path / RUN_INFO
        self.metrics = self.path / METRICS
        self.report = self.path / REPORT
        self.log = self.path / LOG
        self.model = self.path / MODEL
        self.checkpoints = self.path / CHECKPOINTS
        self.plots = self.path / PLOTS
        self.continual = self.path / CONTINUAL
        self.evaluations = self.path / EVALUATIONS

    def finished(self) -> bool:
        """Whether the run (or continual stream) wrote its last file."""
        return self.metrics.is_file() or self.continual.is_file()


def check_output_dir(
    path: str | Path,
    overwrite: bool,
    field: str = "output_dir",
    overwrite_field: str = "overwrite",
    overwrite_hint: str = "overwrite=true",
    inputs: Any = None,
) -> Path:
    """Raise a ConfigError (naming `field`, or `overwrite_field` for what overwrite may not
    delete) unless `path` can be written; writes nothing.

    `inputs` is what the command will read (a config as a dict, or {field: path}): overwrite is
    refused when any path named in it lies inside `path`, since replacing `path` would delete it
    before it is read."""
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ConfigError(field, f"{out} exists and is not a directory (or is a link)")
        if not overwrite:
            raise ConfigError(field, f"{out} already exists; pass {overwrite_hint} to replace it")
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise ConfigError(field, f"{out} holds the working directory; refusing to replace it")
        if not made_by_lmadapt(out):
            raise ConfigError(
                overwrite_field,
                f"{out} was not created by lmadapt (it has no {MARKER} marker), so overwrite "
                "will not delete it; choose another output_dir or remove it yourself",
            )
        _refuse_inputs_inside(out, inputs, overwrite_field)
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(field, f"{probe} is a file, so {out} cannot be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(field, f"{probe} is not writable")
    return out


def _paths(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every (dotted field, string) leaf of a nested config, as candidate paths."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from _paths(v, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _paths(v, f"{where}[{i}]")
    elif isinstance(value, (str, os.PathLike)) and str(value).strip():
        yield where, str(value)


def _refuse_inputs_inside(out: Path, inputs: Any, overwrite_field: str) -> None:
    """Refuse to replace `out` when a file or directory the command reads lies inside it (or is
    it): `overwrite` would delete the user's data, model or run before reading it."""
    root = out.resolve()
    for where, value in _paths(inputs):
        if where.rsplit(".", 1)[-1] == "output_dir":  # where the command writes, not an input
            continue
        try:
            path = Path(value).expanduser()
            if not path.exists():
                continue
            resolved = path.resolve()
        except (OSError, ValueError):  # not a path at all (NUL, too long): nothing to protect
            continue
        if resolved == root or root in resolved.parents:
            raise ConfigError(
                overwrite_field,
                f"{out} holds {value} ({where}), an input of this command; replacing {out} "
                "would delete it: choose another output directory or move the input out",
            )


def made_by_lmadapt(out: Path) -> bool:
    """Whether `out` may be deleted by overwrite: it has the marker, is empty, or is a run
    directory from before the marker (its run.json says so)."""
    if (out / MARKER).is_file() or not any(out.iterdir()):
        return True
    try:
        return "lmadapt_run" in json.loads(RunDir(out).run_info.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def mark(out: Path, command: str) -> None:
    """Claim `out` as lmadapt's (written first, so even an interrupted run can be replaced)."""
    (out / MARKER).write_text(json.dumps({"lmadapt": command}) + "\n", encoding="utf-8")


def create_output_dir(out: Path, command: str) -> None:
    """Replace `out` (already checked by `check_output_dir`) with a fresh, marked directory."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mark(out, command)
