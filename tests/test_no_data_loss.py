"""#29 acceptance: every command that takes an output directory (train, continual, distill,
prompt, export --merge, compare, hpo, auto), run the way a user runs it (`lmadapt.cli.main`),
never deletes what the user wrote nor what had finished, and leaves nothing half-written:

A. an input inside the output directory, with overwrite: refused (exit 2), everything left;
B. Ctrl-C (a KeyboardInterrupt raised from a `sys.settrace` hook at the N-th line lmadapt's own
   code executes) on the line after the first final file is written, and at EXAMPLES lines
   drawn from a seeded random over those an uninterrupted run executes;
C. an error (disk full) at the start of the second epoch / step / seed / route / trial.

After each: the user's directory (data, a model, an earlier finished run, notes.txt) is byte for
byte the same, nothing outside the output directory changed, every final file (metrics.json,
continual.json, ...) and complete hpo trial that existed when the interrupt came still exists,
a train run that had a checkpoint resumes, and an output directory left behind holds something
worth keeping. The helpers under all of them (run_directory, atomic_dir, atomic_path) are also
interrupted on every one of their lines.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import itertools
import json
import random
import shutil
import sqlite3
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import lmadapt
from lmadapt.api import resume, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.hooks import Hook
from lmadapt.io import atomic_dir
from lmadapt.rundir import MARKER, mark
from lmadapt.session import run_directory
from lmadapt.train.checkpoint import latest_checkpoint
from lmadapt.train.loop import Trainer
from tests.conftest import sentiment_rows, write_csv

SRC = str(Path(lmadapt.__file__).resolve().parent) + "/"
FINAL = ("metrics.json", "continual.json", "lmadapt_export.json", "compare.json")
"""The files a command writes once its work (or a part of it: a route, a trial, a method) is
done: once one exists, no interrupt or error may delete it."""
EXAMPLES = 3
"""Interrupt points drawn per command (each one a whole run on tiny models)."""


def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------- the injector


class Interrupter:
    """Counts the lines lmadapt's own code executes in this thread (`sys.settrace`) and raises
    KeyboardInterrupt (a Ctrl-C) at line `at` (None: only counts), calling `on_fire` first to
    record what existed at that moment. Raising from the trace function unsets it: one
    interrupt per run.

    `where` limits the count to functions of these names (e.g. the run-directory helpers)."""

    def __init__(
        self,
        at: int | None = None,
        on_fire: Callable[[], Any] | None = None,
        where: tuple[str, ...] = (),
    ):
        self.at, self.on_fire, self.where = at, on_fire, where
        self.count = 0
        self.fired: Any = None
        self.place = ""
        """Where it fired: lmadapt's file and line."""

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        ours = code.co_filename.startswith(SRC) and (not self.where or code.co_name in self.where)
        return self._line if ours else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.count += 1
            if self.count == self.at:
                self.place = f"{frame.f_code.co_filename.removeprefix(SRC)}:{frame.f_lineno}"
                self.fired = self.on_fire() if self.on_fire else True
                raise KeyboardInterrupt
        return self._line

    def __enter__(self) -> Interrupter:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


class _FailAt(Hook):
    """`error` at the first batch of epoch `epoch` (0-based)."""

    def __init__(self, epoch: int, error: BaseException):
        self.epoch, self.error = epoch, error

    def on_train_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def loss_term(self, model: Any, batch: Any, outputs: Any) -> None:
        if self.trainer.state.epoch >= self.epoch:
            raise self.error


def fail_in_fit(monkeypatch: pytest.MonkeyPatch, call: int, epoch: int) -> None:
    """The disk fills up at the start of epoch `epoch` of the `call`-th training loop run
    (train's 2nd epoch, continual's 2nd step, auto's 2nd route, hpo's 2nd trial ...)."""
    real, calls = Trainer.fit, itertools.count(1)

    def fit(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        if next(calls) == call:
            self.hooks.append(_FailAt(epoch, disk_full()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)


# ---------------------------------------------------------------------- what is on disk


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file, link and directory under `root` (but `skip`'s subtree): path -> content."""
    found = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        rel = str(p.relative_to(root))
        if p.is_symlink():
            found[rel] = f"-> {p.readlink()}"
        elif p.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = _sha(p)
    return found


@dataclass
class Done:
    """What had finished in an output directory at one moment."""

    final: dict[str, str] = field(default_factory=dict)
    """sha256 -> path of each final file (a moved directory keeps its hash)."""
    checkpoint: bool = False
    """A train run that can be resumed (a complete checkpoint, not finished)."""
    trials: set[int] = field(default_factory=set)
    """Complete hpo trials in study.db."""


def done(out: Path) -> Done:
    if not out.is_dir():
        return Done()
    final = {_sha(p): str(p) for p in out.rglob("*") if p.name in FINAL and p.is_file()}
    checkpoint = not (out / "metrics.json").exists() and bool(
        latest_checkpoint(out / "checkpoints")
    )
    return Done(final, checkpoint, complete_trials(out))


def complete_trials(study_dir: Path) -> set[int]:
    db = study_dir / "study.db"
    if not db.is_file():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        try:
            rows = c.execute("SELECT number FROM trials WHERE state = 'COMPLETE'").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return set()
    return {n for (n,) in rows}


# ---------------------------------------------------------------------- the commands


@dataclass
class Command:
    """One command as a user runs it, on tiny inputs in the user's directory `u`."""

    name: str
    argv: Callable[[Path, Path], list[str]]
    """(u, out) -> the command line."""
    input_inside: Callable[[Path, Path], list[str]]
    """(u, out) -> the command line of a run that reads an input it copied into `out`
    (an lmadapt directory), with overwrite."""
    fail_late: Callable[[pytest.MonkeyPatch], None]
    """Makes a disk-full error come after the first epoch / step / seed / route / trial."""
    keeps: Callable[[Path], bool]
    """Whether an output directory left after an interrupt holds something worth keeping."""
    setup: Callable[[pytest.MonkeyPatch], None] = lambda mp: None
    marked: bool = True
    """The output directory carries lmadapt's marker (hpo's study directory does not)."""


def _finished(out: Path) -> bool:
    return bool(done(out).final)


def _train_keeps(out: Path) -> bool:
    return _finished(out) or (
        (out / "config.yaml").is_file() and latest_checkpoint(out / "checkpoints") is not None
    )


def _has_run(out: Path) -> bool:
    """compare's directory: a method's run worth keeping, or the table."""
    return any(_train_keeps(p) for p in out.iterdir() if p.is_dir()) or _finished(out)


def _lmadapt_dir(out: Path) -> Path:
    out.mkdir(parents=True)
    mark(out, "train")
    return out


def _copy_into(out: Path, src: Path) -> Path:
    _lmadapt_dir(out)
    dest = out / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    return dest


def _inside_train(u: Path, out: Path) -> list[str]:
    model = _copy_into(out, u / "model")
    return ["train", str(u / "run.yaml"), f"output_dir={out}", f"model={model}", "overwrite=true"]


def _inside_continual(u: Path, out: Path) -> list[str]:
    data = _copy_into(out, u / "num.csv")
    cfg = yaml.safe_load((u / "stream.yaml").read_text())
    cfg["stream"][1]["data"]["train"] = str(data)  # overrides cannot index the stream
    path = u.parent / "stream_inside.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["continual", str(path), f"output_dir={out}", "overwrite=true"]


def _inside_distill(u: Path, out: Path) -> list[str]:
    teacher = _copy_into(out, u / "prior_run")
    return [
        "distill", str(u / "distill.yaml"), f"output_dir={out}", "overwrite=true",
        f"teacher.run_dir={teacher}",
    ]  # fmt: skip


def _inside_prompt(u: Path, out: Path) -> list[str]:
    dev = _copy_into(out, u / "sst_dev.csv")
    return [
        "prompt",
        str(u / "prompt.yaml"),
        f"output_dir={out}",
        "overwrite=true",
        f"data.dev={dev}",
    ]


def _inside_export(u: Path, out: Path) -> list[str]:
    run = _copy_into(out, u / "prior_run")
    return ["export", str(run), "--merge", str(out), "--overwrite"]


def _inside_compare(u: Path, out: Path) -> list[str]:
    _lmadapt_dir(out)  # an earlier compare's directory, its lora run holding the data
    data = _copy_into(out / "lora", u / "train.csv")
    return [*_compare(u, out), f"data.train={data}", "overwrite=true"]


def _inside_hpo(u: Path, out: Path) -> list[str]:
    data = _copy_into(out, u / "train.csv")
    return [*_hpo(u, out), f"data.train={data}"]


def _inside_auto(u: Path, out: Path) -> list[str]:
    data = _copy_into(out, u / "num.csv")
    return ["auto", str(data), *_auto(u, out)[2:], "--overwrite"]


def _compare(u: Path, out: Path) -> list[str]:
    return ["compare", "--methods", "lora,bitfit", str(u / "run.yaml"), f"output_dir={out}"]


def _hpo(u: Path, out: Path) -> list[str]:
    space = ["--space", str(u / "space.yaml"), "--trials", "2", "--study-dir", str(out)]
    return ["hpo", str(u / "run.yaml"), *space]


def _auto(u: Path, out: Path) -> list[str]:
    models = ["--model", f"lora={u / 'model'}", "--model", f"full={u / 'model'}"]
    return ["auto", str(u / "num.csv"), "--out", str(out), "--budget", "5m", *models]


def _in_process(cmd: list[str], log: Path) -> int:
    """compare's `python -m lmadapt train ...` run in this process (so the injector reaches
    it): its exit code as the child's, and Ctrl-C, which a terminal sends to the whole process
    group, reaching compare too once the child has stopped."""
    try:
        code = main(cmd[cmd.index("train") :])
    except Exception:
        code = 1
    if code == 130:
        raise KeyboardInterrupt
    return code


def _compare_setup(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(importlib.import_module("lmadapt.compare"), "_train_child", _in_process)


def _auto_setup(mp: pytest.MonkeyPatch) -> None:
    """Two trained routes (lora, full) of a couple of epochs each, as in tests/test_auto.py."""
    plan, routes = (importlib.import_module(f"lmadapt.auto.{m}") for m in ("plan", "routes"))
    mp.setattr(plan, "TARGET_SAMPLES", 60)
    mp.setattr(plan, "FEW_PER_LABEL", 5)
    for route in (routes.HeadLora, routes.HeadFull):
        mp.setattr(route, "min_seconds", 1.0)


def _second_seed_fails(mp: pytest.MonkeyPatch) -> None:
    classify = importlib.import_module("lmadapt.prompting.modes.classify")
    real, calls = classify.score_seed, itertools.count(1)

    def score_seed(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 2:
            raise disk_full()
        return real(*args, **kwargs)

    mp.setattr(classify, "score_seed", score_seed)


def _reload_check_fails(mp: pytest.MonkeyPatch) -> None:
    """The merged model was written; checking its reloaded copy fails."""
    export = importlib.import_module("lmadapt.export")
    real, calls = export._check, itertools.count(1)

    def check(*args: Any) -> None:
        if next(calls) == 2:
            raise disk_full()
        real(*args)

    mp.setattr(export, "_check", check)


COMMANDS = {
    c.name: c
    for c in [
        Command(
            "train",
            lambda u, out: ["train", str(u / "run.yaml"), f"output_dir={out}"],
            _inside_train,
            lambda mp: fail_in_fit(mp, call=1, epoch=1),
            _train_keeps,
        ),
        Command(
            "continual",
            lambda u, out: ["continual", str(u / "stream.yaml"), f"output_dir={out}"],
            _inside_continual,
            lambda mp: fail_in_fit(mp, call=2, epoch=0),
            _finished,
        ),
        Command(
            "distill",
            lambda u, out: ["distill", str(u / "distill.yaml"), f"output_dir={out}"],
            _inside_distill,
            lambda mp: fail_in_fit(mp, call=1, epoch=1),
            _train_keeps,  # see test_a_distill_error_after_a_checkpoint_leaves_no_false_resume
        ),
        Command(
            "prompt",
            lambda u, out: ["prompt", str(u / "prompt.yaml"), f"output_dir={out}"],
            _inside_prompt,
            _second_seed_fails,
            _finished,
        ),
        Command(
            "export",
            lambda u, out: ["export", str(u / "prior_run"), "--merge", str(out)],
            _inside_export,
            _reload_check_fails,
            _finished,
        ),
        Command(
            "compare",
            _compare,
            _inside_compare,
            lambda mp: fail_in_fit(mp, call=2, epoch=0),
            _has_run,
            _compare_setup,
        ),
        Command(
            "hpo",
            _hpo,
            _inside_hpo,
            lambda mp: fail_in_fit(mp, call=2, epoch=0),
            lambda out: (out / "study.db").is_file(),
            marked=False,
        ),
        Command(
            "auto",
            _auto,
            _inside_auto,
            lambda mp: fail_in_fit(mp, call=2, epoch=0),
            lambda out: any(p.name == "metrics.json" for p in out.rglob("*")),
            _auto_setup,
        ),
    ]
}


# ---------------------------------------------------------------------- the user's files


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tiny_bert) -> Path:
    """A finished LoRA run (export's source, distill's teacher, and for the others a run that
    must stay untouched)."""
    root = tmp_path_factory.mktemp("prior")
    data = {
        "train": str(write_csv(root / "train.csv", sentiment_rows(16, seed=4))),
        "dev": str(write_csv(root / "dev.csv", sentiment_rows(8, seed=5))),
    }
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": data,
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "threads": 1},
        "output_dir": str(root / "run"),
    }
    train(build_run_config(cfg))
    return root / "run"


def _numeric(n: int, seed: int) -> list[tuple[str, str]]:
    return [(t, "1" if y == "pos" else "0") for t, y in sentiment_rows(n, seed)]


@pytest.fixture
def user(tmp_path, tiny_bert, tiny_llama, prior_run, monkeypatch) -> Path:
    """The user's directory: data, a model, a finished run, notes and each command's config."""
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    u = tmp_path / "user"
    u.mkdir()
    (u / "notes.txt").write_text("my own notes, not lmadapt's\n")
    shutil.copytree(tiny_bert, u / "model")
    shutil.copytree(tiny_llama, u / "llama")
    shutil.copytree(prior_run, u / "prior_run")
    write_csv(u / "train.csv", sentiment_rows(32, seed=1))
    write_csv(u / "dev.csv", sentiment_rows(12, seed=2))
    write_csv(u / "num.csv", _numeric(32, seed=1))
    write_csv(u / "num_dev.csv", _numeric(12, seed=2))
    write_csv(u / "sst_dev.csv", _numeric(8, seed=3), ("sentence", "label"))
    write_csv(u / "sst_train.csv", _numeric(16, seed=4), ("sentence", "label"))
    loop = {"batch_size": 8, "log_every": 2, "precision": "fp32", "threads": 1}
    run = {
        "model": str(u / "model"),
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": {"train": str(u / "train.csv"), "dev": str(u / "dev.csv")},
        "train": {**loop, "epochs": 2, "eval_every": 2},
    }
    files = {
        "run.yaml": run,
        "space.yaml": {"method.r": {"type": "categorical", "choices": [2, 4]}},
        "distill.yaml": {
            **run,
            "teacher": {"type": "run", "run_dir": str(u / "prior_run")},
            "method": {"name": "bitfit"},
        },
        "stream.yaml": {
            "model": str(u / "model"),
            "strategy": {"name": "naive"},
            "train": {**loop, "epochs": 1},
            "stream": [
                {"name": "a", "task": {"type": "classification"}, "data": run["data"]},
                {
                    "name": "b",
                    "task": {"type": "classification"},
                    "data": {"train": str(u / "num.csv"), "dev": str(u / "num_dev.csv")},
                },
            ],
        },
        "prompt.yaml": {
            "model": str(u / "llama"),
            "template": "sentiment",
            "k": 1,
            "seeds": [0, 1],
            "batch_size": 8,
            "threads": 1,
            "data": {"dev": str(u / "sst_dev.csv"), "train": str(u / "sst_train.csv")},
        },
    }
    for name, content in files.items():
        (u / name).write_text(yaml.safe_dump(content))
    return u


def check_no_loss(root: Path, user_before: dict[str, str], out: Path, command: Command) -> None:
    """The user's directory is as it was, and an output directory left behind is lmadapt's and
    holds something worth keeping (not half-written)."""
    assert tree(root / "user") == user_before, "the user's files changed"
    if out.exists():
        assert out.is_dir() and (not command.marked or (out / MARKER).is_file())
        assert command.keeps(out), f"{out} was left half-written: {sorted(tree(out))}"


# ---------------------------------------------------------------------- A. inputs inside


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_input_inside_the_output_directory_is_refused(name, user, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    command.setup(monkeypatch)
    out = tmp_path / "out"
    argv = command.input_inside(user, out)
    before = tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "an input of this command" in err or "holds no study.db" in err, err
    assert tree(tmp_path) == before  # the input, the directory, and everything else


# ---------------------------------------------------------------------- B. Ctrl-C anywhere


def _interrupted(
    name: str, user: Path, tmp_path: Path, out: Path, interrupter: Interrupter, where: str
) -> bool:
    """Run `name` into `out` under `interrupter`; if it fired, check that nothing was lost:
    exit 130, the user's files, nothing beside `out`, every final file and complete trial that
    existed when it fired, and a train run that had a checkpoint resumes."""
    command = COMMANDS[name]
    user_before, outside = tree(user), tree(tmp_path, skip=out)
    try:
        with interrupter:
            code = main(command.argv(user, out))
    except KeyboardInterrupt:  # before main's own handler (its first lines)
        code = 130
    if interrupter.fired is None:
        return False  # this run executed fewer lines (a time check took another branch)
    where += f" ({interrupter.place})"
    assert code == 130, f"{where}: exit {code}"
    seen: Done = interrupter.fired
    check_no_loss(tmp_path, user_before, out, command)
    assert tree(tmp_path, skip=out) == outside, f"{where}: files left beside {out}"
    now = done(out)
    lost = {path for sha, path in seen.final.items() if sha not in now.final}
    assert not lost, f"{where}: finished files deleted: {lost}"
    assert seen.trials <= now.trials, f"{where}: complete trials lost"
    if seen.checkpoint and name == "train":
        assert resume(out)["resumed"], where
    return True


@pytest.mark.parametrize("name", list(COMMANDS))
def test_ctrl_c_just_after_a_final_file_loses_nothing(name, user, tmp_path, monkeypatch):
    """Ctrl-C on the line after the first final file (a run's metrics.json, a route's, a
    trial's ...) is written: what had finished is kept."""
    COMMANDS[name].setup(monkeypatch)
    out = tmp_path / "out"
    interrupter = Interrupter(None, lambda: done(out))
    real = lmadapt.io.atomic_path

    @contextlib.contextmanager
    def atomic_path(path: Path) -> Iterator[Path]:
        with real(path) as tmp:
            yield tmp
        if Path(path).name in FINAL and interrupter.at is None:
            interrupter.at = interrupter.count + 1  # the next line of lmadapt's

    monkeypatch.setattr(lmadapt.io, "atomic_path", atomic_path)
    assert _interrupted(name, user, tmp_path, out, interrupter, f"{name}: after a final file")


@pytest.mark.slow  # several runs per command, each interrupted and checked
@pytest.mark.parametrize("name", list(COMMANDS))
def test_ctrl_c_at_a_random_moment_loses_nothing(name, user, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    command.setup(monkeypatch)
    # the first run also imports modules and fills the feature cache: count a second one
    assert main(command.argv(user, tmp_path / "first")) == 0, capsys.readouterr().err
    with Interrupter() as counter:
        assert main(command.argv(user, tmp_path / "counted")) == 0, capsys.readouterr().err
    rng = random.Random(f"{name}-ctrl-c")
    fired = [
        _interrupted(
            name,
            user,
            tmp_path,
            out := tmp_path / f"ctrl-c-{at}",
            Interrupter(at, lambda out=out: done(out)),
            f"{name}: Ctrl-C at line {at} of {counter.count}",
        )
        for at in sorted(rng.sample(range(1, counter.count + 1), EXAMPLES))
    ]
    assert any(fired), f"{name}: no interrupt fired"


# ---------------------------------------------------------------------- C. a late error


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_error_after_the_first_epoch_loses_nothing(name, user, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    command.setup(monkeypatch)
    out = tmp_path / "out"
    if name == "export":  # an earlier export, replaced only by a finished one
        assert main([*command.argv(user, out)]) == 0
        command.fail_late(monkeypatch)
        previous = tree(out)
        assert main([*command.argv(user, out), "--overwrite"]) == 2
        assert tree(out) == previous
        return
    user_before = tree(user)
    outside = tree(tmp_path, skip=out)
    command.fail_late(monkeypatch)
    code = main(command.argv(user, out))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    check_no_loss(tmp_path, user_before, out, command)
    assert tree(tmp_path, skip=out) == outside
    first = {
        "train": out / "checkpoints",
        "compare": out / "lora" / "metrics.json",
        "hpo": out / "trials" / "0" / "metrics.json",
        "auto": out / "winner" / "metrics.json",  # the first route, lora, won: the other failed
    }
    if name in first:  # what the first epoch / method / trial / route finished
        assert first[name].exists(), f"{name}: exit {code}: {err}"
    if name == "auto":  # the failed route is reported in the leaderboard
        assert code == 0
    else:
        assert code == 2 and "No space left on device" in err, err
    if name == "train":
        assert "--resume" in err and resume(out)["resumed"]
    if name == "hpo":
        assert complete_trials(out) == {0}
        assert f"the study is kept in {out}: re-run the same command to resume it" in err


def test_a_distill_error_after_a_checkpoint_leaves_no_false_resume(user, tmp_path, monkeypatch):
    COMMANDS["distill"].fail_late(monkeypatch)
    out = tmp_path / "out"
    assert main(COMMANDS["distill"].argv(user, out)) == 2
    monkeypatch.undo()
    if out.exists():  # kept: then the advice it printed must work
        try:
            code = main(["train", "--resume", str(out)])
        except Exception:
            code = 1
        assert code == 0


def test_a_bad_file_in_a_later_continual_step_fails_before_any_training(
    user, tmp_path, monkeypatch, capsys
):
    (user / "bad.csv").write_text("text,label\nthe film was good,1\nthe plot was bad,\n")
    cfg = yaml.safe_load((user / "stream.yaml").read_text())
    cfg["stream"][1]["data"]["train"] = str(user / "bad.csv")
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(cfg))
    fits = []
    real = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or real(self, *a, **k))
    assert main(["continual", str(tmp_path / "stream.yaml"), f"output_dir={tmp_path / 'o'}"]) == 2
    assert "bad.csv" in capsys.readouterr().err
    assert not fits, "step 1 trained before step 2's file was read"


def test_compare_never_writes_into_a_directory_lmadapt_did_not_make(
    user, tmp_path, monkeypatch, capsys
):
    """compare writes compare.md/.json/.png and METHOD.log into output_dir: a user's own
    directory holding files of those names is refused, as overwrite refuses it elsewhere."""
    COMMANDS["compare"].setup(monkeypatch)
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "compare.md").write_text("my own comparison\n")
    (mine / "lora.log").write_text("my own log\n")
    before = tree(tmp_path)
    assert main(_compare(user, mine)) == 2
    err = capsys.readouterr().err
    assert "field 'output_dir'" in err and "not created by lmadapt" in err, err
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------- every line of the helpers


def _every_line(run: Callable[[], None], where: tuple[str, ...]) -> Iterator[int]:
    """Line numbers 1..N of an uninterrupted `run` counted in `where`: each is one Ctrl-C."""
    with Interrupter(where=where) as counter:
        run()
    assert counter.count > 3
    yield from range(1, counter.count + 1)


def _ctrl_c(
    run: Callable[[], None], at: int, where: tuple[str, ...], on_fire: Callable[[], Any] = bool
) -> Any:
    """Run with Ctrl-C at line `at`; returns what `on_fire` saw then."""
    interrupter = Interrupter(at, on_fire=on_fire, where=where)
    with interrupter, contextlib.suppress(KeyboardInterrupt):
        run()
    assert interrupter.fired is not None
    return interrupter.fired


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_ctrl_c_on_any_line_of_the_run_directory_keeps_the_old_or_a_finished_run(
    tmp_path, existing
):
    """Whichever line of run_directory (and of the writes inside it) Ctrl-C lands on: the
    output directory is gone, or the old run whole, or the finished new one; nothing beside it."""
    where = ("run_directory", "resumable", "create_output_dir", "mark", "atomic_path", "write_text")
    where += ("write_json",)
    old = {"metrics.json": '{"old": 1}', MARKER: "{}"}
    new = _h(json.dumps({"new": 1}, indent=2) + "\n")

    def run(out: Path) -> None:
        with run_directory(out, "train"):
            (out / "log.jsonl").write_text("{}\n")
            lmadapt.io.write_json(out / "metrics.json", {"new": 1})  # written last: finished

    for at in _every_line(lambda: run(_fresh(tmp_path / "count", old, existing)), where):
        out = _fresh(tmp_path / f"at-{at}", old, existing)
        before = tree(tmp_path, skip=out)
        finished = _ctrl_c(lambda o=out: run(o), at, where, lambda o=out: done(o).final)
        assert tree(tmp_path, skip=out) == before, f"line {at}: files left beside {out}"
        if new in finished:  # the new run had finished when Ctrl-C came
            assert done(out).final.get(new), f"line {at}: the finished run was deleted"
        if out.exists():
            kept = {p.name: p.read_text() for p in out.iterdir()}
            assert kept == old or '"new": 1' in kept.get("metrics.json", ""), (at, kept)


def _fresh(out: Path, files: dict[str, str], existing: bool) -> Path:
    if existing:
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
    return out


def test_ctrl_c_on_any_line_of_an_atomic_write_keeps_the_old_or_the_new(tmp_path):
    """atomic_dir and atomic_path: the target holds the old content or the new, whole, and no
    temporary file or directory stays beside it (the user's directory, for prompt and export)."""
    where = ("atomic_dir", "atomic_path", "write_text")

    def write_dir(path: Path) -> None:
        with atomic_dir(path) as tmp:
            (tmp / "a").write_text("new")
            (tmp / "b").write_text("new")

    def write_file(path: Path) -> None:
        lmadapt.io.write_text(path, "new")

    for write, make_old in [
        (write_dir, lambda p: _fresh(p, {"a": "old", "b": "old"}, True)),
        (write_file, lambda p: p.write_text("old")),
    ]:
        count = tmp_path / f"count-{write.__name__}"
        for at in _every_line(lambda w=write, c=count: w(c), where):
            root = tmp_path / f"{write.__name__}-{at}"
            root.mkdir()
            target = root / "target"
            make_old(target)
            _ctrl_c(lambda w=write, t=target: w(t), at, where)
            assert [p.name for p in root.iterdir()] == ["target"], (write.__name__, at)
            stash = "target/.target.old"  # the old content, removed last: inside at worst
            content = {k: v for k, v in tree(root).items() if not k.startswith(stash)}
            assert content in (
                {"target": "dir", "target/a": _h("old"), "target/b": _h("old")},
                {"target": "dir", "target/a": _h("new"), "target/b": _h("new")},
                {"target": _h("old")},
                {"target": _h("new")},
            ), (write.__name__, at, content)


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
