"""What the dashboard knows about a directory of runs: found by walking it, read from the files
each command writes, never trusted.

Every entry is named by its path relative to the runs root, and every name that comes back from
a browser is turned into a directory by `lmadapt.paths.inside`, which resolves it (symlinks
included) and refuses anything outside the root. Every file of an entry is opened through
`lmadapt.paths.open_inside` with the entry as its root: a file that links out of its run, a FIFO
or a device is a problem of that entry, never read. Files are parsed defensively: a run being
written, a foreign directory or an unparsable json/yaml becomes an entry with `status: "bad"` and
the problem, never an exception that takes the page down.

A training run holds no lock, so "running" is inferred: no metrics.json (written last) and a
log.jsonl changed within `RUNNING_WINDOW_S`; older unfinished runs are "interrupted".
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from lmadapt.paths import RefusedPath, inside, open_inside
from lmadapt.rundir import (
    CONFIG,
    CONTINUAL,
    EVALUATIONS,
    LOG,
    MARKER,
    METRICS,
    MODEL,
    REPORT,
    RUN_INFO,
)

RUNNING_WINDOW_S = 120.0
"""An unfinished run whose log changed this recently counts as running (evaluations on a
large dev set can leave the log quiet for a minute)."""
MAX_DEPTH = 6
"""How deep under the root runs are looked for (hpo trials sit at study/trials/N)."""
TAIL_BYTES = 16 * 1024
"""How much of log.jsonl the runs table reads: enough for the latest loss and evaluation."""
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
}
"""Files a run page may show; nothing else in a run directory is served (no SVG: it can hold
scripts)."""
RUN_FILES = (CONFIG, RUN_INFO, METRICS, LOG)
MAX_TEXT_BYTES = 8 * 2**20
"""Largest file read whole (report, config, json): a larger one is a problem of its run."""
MAX_POINTS = 2000
"""Most points of one curve sent to the browser: a longer log is thinned as it is read."""
MAX_LINE_BYTES = 2**20
"""A longer log.jsonl line is not a record (it is skipped without being held)."""


def open_image(entry: Path, name: str) -> BinaryIO:
    """The image file `name` of the run directory `entry` (a type in IMAGE_TYPES), open."""
    f = open_inside(entry, name)
    if Path(f.name).suffix.lower() not in IMAGE_TYPES:
        f.close()
        raise RefusedPath(f"{name[:64]!r}: not an image")
    return f


# ---------------------------------------------------------------------- reading files


def read_text(run: Path, name: str) -> str:
    """File `name` of run directory `run` (nothing outside it, no FIFO), up to MAX_TEXT_BYTES."""
    with open_inside(run, name) as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{name} is larger than the {MAX_TEXT_BYTES} bytes the dashboard reads")
    return data.decode("utf-8", errors="replace")


def read_json(run: Path, name: str) -> Any:
    return json.loads(read_text(run, name))


SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML has it: the runs table parses every config.yaml, and the
pure-Python parser took 4 times as long (8 ms a config here)."""


def read_yaml(run: Path, name: str) -> Any:
    return yaml.load(read_text(run, name), Loader=SAFE_LOADER)  # noqa: S506 (safe)


def log_records(run: Path, tail: int | None = None) -> Iterator[dict[str, Any] | None]:
    """The records of run directory `run`'s log.jsonl, one at a time, None for each line that is
    not one (a line being written, foreign text, one over MAX_LINE_BYTES); only the last `tail`
    bytes when given. The file is read a line at a time, never held."""
    with open_inside(run, LOG) as f:
        if tail is not None:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail))
            if size > tail:
                f.readline()  # the first line read is cut
        while line := f.readline(MAX_LINE_BYTES):
            if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # the rest of an over-long line
                yield None
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            yield rec if isinstance(rec, dict) else None


def kind_of(path: Path, files: set[str]) -> str | None:
    """What wrote this directory: its marker names the command; without one, its files tell."""
    if MARKER in files:
        try:
            command = read_json(path, MARKER).get("lmadapt")
        except (OSError, ValueError, AttributeError):
            command = None
        if CONTINUAL in files or command == "continual":
            return "continual"
        return command if command in ("hpo", "compare") else "run"
    if "study.db" in files:
        return "hpo"
    if "compare.json" in files:
        return "compare"
    if CONTINUAL in files:
        return "continual"
    if files & set(RUN_FILES):
        return "run"
    return None


DESCEND = {"hpo": {"trials"}, "compare": None, "run": set(), "continual": set()}
"""Which subdirectories of an entry may hold further entries (None: all of them)."""


def scan(root: Path) -> list[dict[str, Any]]:
    """Every entry under `root` (not following symlinks), sorted by path."""
    base = root.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        depth = len(here.relative_to(base).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        kind = kind_of(here, set(filenames))
        if kind is not None:
            found.append(summary(base, here, kind))
            allowed = DESCEND[kind]
            if allowed is not None:
                dirnames[:] = [d for d in dirnames if d in allowed]
        if depth >= MAX_DEPTH:
            dirnames[:] = []
    return found


LOADED = (CONFIG, RUN_INFO, MODEL)
"""What the playground's loader (`api.read_run`, then the model) opens in a run directory. The
base model a config names lies wherever the run was trained from, and is not checked."""


def check_loadable(root: Path, run: Path) -> None:
    """RefusedPath unless every file of LOADED under run directory `run` (links to directories
    followed, each once) is a regular file inside `root`: the loader opens them with no such
    check, and a FIFO would hang it."""
    seen: set[Path] = set()
    for name in LOADED:
        top = run / name
        if not os.path.lexists(top):
            continue  # the loader says what is missing
        if not top.is_dir():
            inside(root, os.path.relpath(top, root))
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            here = inside(root, rel, kind="dir")
            if here in seen:  # a link back up: its files were checked the first time
                dirnames[:] = []
                continue
            seen.add(here)
            for file in filenames:
                inside(root, rel, file)


def entry_id(base: Path, path: Path) -> str:
    return path.relative_to(base).as_posix() if path != base else "."


# ---------------------------------------------------------------------- one entry


WATCHED = (*RUN_FILES, MARKER, CONTINUAL, "study.db", "compare.json", REPORT)
"""The files a row is read from: while none of them changes, the row is the one read before."""
_rows: dict[tuple[Path, str], tuple[tuple, dict[str, Any]]] = {}


def forget() -> None:
    """Drop the kept rows, so that the next scan reads every file (bench/ui_load.py: cold)."""
    _rows.clear()


def _stamp(path: Path) -> tuple:
    out = []
    for name in WATCHED:
        try:
            st = (path / name).stat()
        except OSError:
            continue
        out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


def summary(base: Path, path: Path, kind: str) -> dict[str, Any]:
    """One row of the runs table; a problem reading it gives status "bad" and the reason. Rows
    are kept while their files are unchanged (a running one is always read again: it turns
    "interrupted" by the clock alone)."""
    stamp = _stamp(path)
    kept = _rows.get((path, kind))
    if kept is not None and kept[0] == stamp:
        return {**kept[1], "id": entry_id(base, path), "problems": list(kept[1]["problems"])}
    row: dict[str, Any] = {"id": entry_id(base, path), "kind": kind, "problems": []}
    try:
        {"run": _run_summary, "continual": _continual_summary, "hpo": _hpo_summary}.get(
            kind, _compare_summary
        )(path, row)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as e:
        row["status"] = "bad"
        row["problems"].append(f"{type(e).__name__}: {e}")
    if row["status"] != "running":
        _rows[(path, kind)] = (stamp, {**row, "problems": list(row["problems"])})
    return row


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a mapping")
    return value


def _run_summary(path: Path, row: dict[str, Any]) -> None:
    if not (path / CONFIG).exists():
        raise ValueError("no config.yaml: not a run directory, or one still being created")
    cfg = _mapping(read_yaml(path, CONFIG), CONFIG)
    task, method, train = (cfg.get(k) or {} for k in ("task", "method", "train"))
    row |= {
        "task": task.get("type"),
        "method": method.get("name"),
        "model": cfg.get("model"),
        "metric": train.get("metric"),
    }
    metrics_path, log = path / METRICS, path / LOG
    if metrics_path.exists():
        m = _mapping(read_json(path, METRICS), METRICS)
        dev = m.get("dev") or {}
        metric = row["metric"] or next(iter(dev), None)
        row |= {
            "status": "finished",
            "metric": metric,
            "best": dev.get(metric) if metric else None,
            "trainable_params": m.get("trainable_params"),
            "total_params": m.get("total_params"),
            "wall_seconds": m.get("wall_seconds"),
            "samples_per_second": m.get("samples_per_second"),
        }
        return
    recent = log.is_file() and time.time() - log.stat().st_mtime < RUNNING_WINDOW_S
    row["status"] = "running" if recent else "interrupted"
    if not recent:
        row["hint"] = f"lmadapt train --resume {path}"
    if log.is_file():  # an unfinished run has no best yet: its latest dev score stands in
        row["progress"] = progress(path, cfg)
        row["latest"] = row["progress"].get("dev")
        row["metric"] = row["progress"].get("metric")


def progress(path: Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where a run is: its latest step, epoch, train loss and dev metric (from the log's tail),
    against the configured length."""
    if cfg is None:
        cfg = _mapping(read_yaml(path, CONFIG), CONFIG)
    train = cfg.get("train") or {}
    out: dict[str, Any] = {"epochs": train.get("epochs"), "max_steps": train.get("max_steps")}
    for rec in filter(None, log_records(path, TAIL_BYTES)):
        out["step"], out["epoch"] = rec.get("step"), rec.get("epoch")
        if "loss" in rec:
            out["loss"] = rec["loss"]
        if isinstance(rec.get("dev"), dict) and rec["dev"]:
            metric = train.get("metric") or next(iter(rec["dev"]))
            out["metric"], out["dev"] = metric, rec["dev"].get(metric)
    return out


def _continual_summary(path: Path, row: dict[str, Any]) -> None:
    cfg = read_yaml(path, CONFIG) if (path / CONFIG).is_file() else {}
    cfg = _mapping(cfg or {}, CONFIG)
    row |= {"task": "continual", "model": cfg.get("model")}
    if not (path / CONTINUAL).is_file():
        row["status"] = "interrupted"
        return
    s = _mapping(read_json(path, CONTINUAL), CONTINUAL)
    row |= {
        "status": "finished",
        "method": s.get("strategy"),
        "model": s.get("model"),
        "metric": "average_accuracy",
        "best": s.get("average_accuracy"),
        "wall_seconds": s.get("wall_seconds"),
    }


def _hpo_summary(path: Path, row: dict[str, Any]) -> None:
    row |= {"task": "hpo", "status": "finished" if (path / REPORT).is_file() else "running"}
    trials = hpo_trials(path)
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    row["trials"] = len(trials)
    if done:
        row["metric"] = trials[0]["metric"]
        best = max if trials[0]["direction"] == "maximize" else min
        row["best"] = best(t["value"] for t in done)


def _compare_summary(path: Path, row: dict[str, Any]) -> None:
    c = _mapping(read_json(path, "compare.json"), "compare.json")
    row |= {"task": "compare", "status": "finished", "metric": c.get("metric")}


def hpo_trials(path: Path) -> list[dict[str, Any]]:
    """Every trial of the Optuna study in `path`/study.db: number, state, value, parameters and
    the dev metric at each evaluation (read with optuna, the library that wrote it)."""
    import optuna

    from lmadapt.hpo import STUDY_NAME

    # A read-only URI, so that looking never writes (optuna would create missing tables).
    uri = f"sqlite:///file:{inside(path, 'study.db')}?mode=ro&uri=true"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=uri)
    objective = (study.user_attrs.get("fingerprint") or {}).get("objective", "")
    metric = objective.partition(" dev ")[2] or "objective"  # hpo writes "maximize dev accuracy"
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "intermediate": sorted(t.intermediate_values.items()),
            "metric": metric,
            "direction": study.direction.name.lower(),
        }
        for t in study.get_trials(deepcopy=False)
    ]


class Series:
    """One curve thinned as it is read, in bounded memory: every point while there are fewer
    than MAX_POINTS, then every 2nd, 4th... (halved each time the list fills), plus the last."""

    def __init__(self) -> None:
        self.x: list[Any] = []
        self.y: list[float] = []
        self.every, self.seen = 1, 0
        self.last: tuple[Any, float] | None = None
        """The latest point when it was not kept: shown until the next is read."""

    def add(self, x: Any, y: float) -> None:
        if self.seen % self.every == 0:
            self.x.append(x)
            self.y.append(y)
            if len(self.x) == MAX_POINTS:
                del self.x[1::2], self.y[1::2]
                self.every *= 2
            self.last = None
        else:
            self.last = (x, y)
        self.seen += 1

    def points(self) -> tuple[list[Any], list[float]]:
        if self.last is None:
            return self.x, self.y
        return [*self.x, self.last[0]], [*self.y, self.last[1]]


def curves(path: Path) -> dict[str, Any]:
    """Series for the interactive plots: train loss and learning rate by step, each dev metric
    by step (each at most MAX_POINTS points), and how many log lines could not be read."""
    train: dict[str, Series] = {}
    dev: dict[str, Series] = {}
    bad = 0
    for rec in log_records(path):
        if rec is None:
            bad += 1
            continue
        step = rec.get("step")
        for key in ("loss", "lr"):
            if isinstance(rec.get(key), int | float):
                train.setdefault(key, Series()).add(step, rec[key])
        if isinstance(rec.get("dev"), dict):
            for key, value in rec["dev"].items():
                if isinstance(value, int | float):
                    dev.setdefault(key, Series()).add(step, value)
    return {
        "train": {k: s.points() for k, s in train.items()},
        "dev": {k: s.points() for k, s in dev.items()},
        "unreadable_lines": bad,
    }


def confusion_matrices(path: Path) -> list[dict[str, Any]]:
    """The confusion matrices of a run, per split, from evaluations.json (written beside the
    report, which renders the same numbers as tables)."""
    evaluations = _mapping(read_json(path, EVALUATIONS), EVALUATIONS)
    return [
        {
            "title": f"{split.capitalize()} set",
            "labels": ev["labels"],
            "gold": ev["labels"],
            "matrix": ev["confusion_matrix"],
        }
        for split, ev in evaluations.items()
        if isinstance(ev, dict) and "confusion_matrix" in ev and "labels" in ev
    ]


REWARDS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "logp_accuracy")
"""What a preference run's page shows of each split, trained beside base: the metrics.json keys,
each also as `base_<key>` (the untrained model scored as if it were the policy)."""


def rewards(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The rewards of a run's metrics.json per split, trained and base (`REWARDS`), for each split
    that has them (a preference run's); [] for any other run. A value that is not a finite
    number is None."""

    def numbers(m: dict[str, Any], prefix: str) -> dict[str, float | None]:
        return {k: _number(m.get(prefix + k)) for k in REWARDS}

    return [
        {"split": split, "trained": numbers(m, ""), "base": numbers(m, "base_")}
        for split, m in metrics.items()
        if isinstance(m, dict) and "reward_accuracy" in m
    ]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value
