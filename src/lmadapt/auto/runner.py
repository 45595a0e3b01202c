"""`lmadapt auto`: the budget, the routes run one after the other, the winner and the report."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmadapt.api import evaluate, load_run
from lmadapt.auto.plan import Plan, check_models, make_plan
from lmadapt.auto.routes import (
    OK,
    ROUTES,
    Deadline,
    OutOfTime,
    Route,
    Skip,
    best,
    check_route_models,
    fitting_routes,
    time_limit,
)
from lmadapt.compare import dir_bytes
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluate.report import markdown_table
from lmadapt.io import write_json, write_text
from lmadapt.rundir import RunDir, check_output_dir
from lmadapt.session import run_directory
from lmadapt.train.loop import TrainingInterrupted

RESERVE = 0.25
"""Share of a route's time kept for loading, the final evaluation and the speed probe."""
SPEED_SHARE = 0.1
"""Share of a route's time its prediction-speed probe may take (at least one batch)."""
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(f"(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?{_NUMBER}?")
"""Hours, minutes, seconds, each optional and in that order, and a bare number last in the unit
below the one before it (seconds alone): 90s, 10m, 1h, 1h30m, 1h30 (90 min), 2m30 (150 s), 45."""


class AutoInterrupted(LmadaptError):
    """Ctrl-C during `lmadapt auto`: the message says what was kept."""

    exit_code = 130


def parse_budget(budget: str | float) -> float:
    """Seconds in a budget: a number of seconds or a duration like '90s', '10m', '1h', '1h30m'
    ('1h30' is 1 h 30 min, '2m30' 2 min 30 s)."""
    if isinstance(budget, (int, float)):
        seconds = float(budget)
    else:
        match = _DURATION.fullmatch(budget.replace(" ", "").lower())
        if match is None or not any(match.groups()) or (match[3] and match[4]):
            raise ConfigError(
                "--budget", f"expected e.g. 90s, 10m, 1h, 1h30m or 1h30, got {budget!r}"
            )
        h, m, s, bare = (float(g or 0) for g in match.groups())
        unit = 60 if match[1] and not match[2] else 1  # 1h30: minutes; 2m30, 45: seconds
        seconds = 3600 * h + 60 * m + s + unit * bare
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError("--budget", f"must be a positive duration, got {budget!r}")
    return seconds


@dataclass(frozen=True)
class Window:
    """The whole call's time: `seconds` from `started` (time.monotonic())."""

    started: float
    seconds: float

    @property
    def end(self) -> float:
        return self.started + self.seconds


@dataclass
class ScoreOnTest:
    """The winner on the test file: its metrics, or a note saying why there are none."""

    metrics: dict[str, float] | None = None
    seconds: float | None = None
    note: str = ""
    interrupted: bool = False


def auto(
    train_file: str | Path,
    dev_file: str | Path | None = None,
    budget: str | float = "10m",
    out: str | Path = "runs/auto",
    test_file: str | Path | None = None,
    task: str | None = None,
    prefer: Literal["accuracy", "speed"] = "accuracy",
    template: str | dict[str, Any] | None = None,
    verbalizer: dict[str, Any] | None = None,
    models: dict[str, str] | None = None,
    fmt: str = "auto",
    seed: int = 42,
    device: str = "auto",
    overwrite: bool = False,
    started: float | None = None,
) -> dict[str, Any]:
    """Run the routes that fit the data within `budget`, keep the best by dev metric in
    OUT/winner (an ordinary run directory) and write report.md and leaderboard.json to `out`;
    returns the leaderboard. `models` maps route names to models replacing their defaults;
    `template`/`verbalizer` give the prompting routes their words (see `prompt_recipe`).

    The budget bounds the whole call from `started` (time.monotonic(); default: now; the CLI
    passes its own start): reading the data, every route's loading, training and scoring, and
    the test file. Every input is checked before the first route. A failure or Ctrl-C keeps
    the routes that finished (with report.md saying so); only a run with none is removed."""
    window = Window(time.monotonic() if started is None else started, parse_budget(budget))
    files = (train_file, dev_file, test_file)
    models = _check_inputs(prefer, models, files)
    inputs = {"train": train_file, "dev": dev_file, "--test": test_file, "--model": models}
    out = check_output_dir(out, overwrite, "--out", "--overwrite", "--overwrite", inputs=inputs)
    rows: list[dict[str, Any]] = []
    with run_directory(out, "auto", keep=lambda: any(r.get("status") in OK for r in rows)):
        plan, carved, speed_file = _plan_within(
            window,
            train_file,
            dev_file,
            out,
            test_file=test_file,
            fmt=fmt,
            task=task,
            template=template,
            verbalizer=verbalizer,
            prefer=prefer,
            seed=seed,
            device=device,
            models=models,
        )
        speed_rows = len(plan.task.read(str(speed_file), fmt, labelled=False))
        interrupted = _run_routes_until_stopped(plan, out, window.end, speed_file, rows)
        winner = _move_winner(rows, plan.mode, interrupted, out)
        score = ScoreOnTest() if interrupted else _score_test(winner, test_file, plan, window.end)
        interrupted = interrupted or score.interrupted
        result = _leaderboard(
            plan, rows, winner, score, interrupted, files, carved, window, speed_rows
        )
        write_json(out / "leaderboard.json", result)
        write_text(RunDir(out).report, markdown(result, plan))
    _raise_unless_won(result, rows, out, test_file)
    return result


def _check_inputs(
    prefer: str, models: dict[str, str] | None, files: tuple[str | Path | None, ...]
) -> dict[str, str]:
    """Everything checkable before any data is read: `prefer`, the route models, the files.
    Returns the route models as a new dict."""
    if prefer not in ("accuracy", "speed"):
        raise ConfigError("--prefer", f"must be accuracy or speed, got {prefer!r}")
    models = dict(models or {})
    unknown = sorted(set(models) - set(ROUTES.names()))
    if unknown:
        raise ConfigError("--model", f"unknown route(s) {unknown}; one of {ROUTES.names()}")
    check_models(models)
    for path in files:
        if path is not None and not Path(path).exists():
            raise DataError(str(path), "no such file")
    return models


def _plan_within(window: Window, *args: Any, **kwargs: Any) -> tuple[Plan, Any, Path]:
    """`make_plan` within the budget, and the route models checked against the task: running
    out while the data is read is an error that says so, before any route starts."""
    try:
        with time_limit(window.end):
            plan, carved, speed_file = make_plan(*args, **kwargs)
            check_route_models(plan)
            return plan, carved, speed_file
    except OutOfTime:
        raise LmadaptError(
            f"the {window.seconds:.0f}s budget ran out while the data was read and checked; "
            "pass a larger --budget"
        ) from None


def _run_routes_until_stopped(
    plan: Plan, out: Path, end: float, speed_file: Path, rows: list[dict[str, Any]]
) -> bool:
    """Run the routes (see `_run_routes`); whether Ctrl-C stopped them, the routes it left
    then marked in `rows`."""
    try:
        _run_routes(plan, out, end, speed_file, rows)
    except (TrainingInterrupted, KeyboardInterrupt):
        _not_run(plan, rows)
        return True
    return False


def _move_winner(
    rows: list[dict[str, Any]], mode: str, interrupted: bool, out: Path
) -> dict[str, Any] | None:
    """The best finished route's row, its run moved to OUT/winner; None when none finished.
    Ctrl-C before any finished is an error (the run directory is then removed)."""
    ok = [r for r in rows if r["status"] in OK]
    if interrupted and not ok:
        raise AutoInterrupted(f"interrupted before any route finished; {out} was removed")
    if not ok:
        return None
    winner = best(ok, mode)
    dest = out / "winner"
    shutil.move(winner["run_dir"], dest)
    winner["run_dir"] = str(dest)
    with contextlib.suppress(OSError):  # the winner was the only route kept: no empty folder
        (out / "routes").rmdir()
    return winner


def _score_test(
    winner: dict[str, Any] | None, test_file: str | Path | None, plan: Plan, end: float
) -> ScoreOnTest:
    """The winner on the test file, within what is left of the budget; Ctrl-C or the budget
    running out leaves a note instead of metrics."""
    score = ScoreOnTest()
    if winner is None or test_file is None:
        return score
    run = Path(winner["run_dir"])
    t0 = time.monotonic()
    try:
        with time_limit(end):
            score.metrics = evaluate(run, test_file, plan.fmt, plan.device)[0].metrics
    except OutOfTime:
        score.note = "the budget ran out before it was scored"
    except KeyboardInterrupt:
        score.interrupted, score.note = True, "interrupted while it was scored"
    score.seconds = round(time.monotonic() - t0, 1)
    return score


def _leaderboard(
    plan: Plan,
    rows: list[dict[str, Any]],
    winner: dict[str, Any] | None,
    score: ScoreOnTest,
    interrupted: bool,
    files: tuple[str | Path, str | Path | None, str | Path | None],
    carved: dict[str, int] | None,
    window: Window,
    speed_rows: int,
) -> dict[str, Any]:
    """leaderboard.json's content (and what `auto` returns): the inputs, the budget used, the
    winner and its test score, every route ranked."""
    train_file, dev_file, test_file = files
    return {
        "train": str(train_file),
        "dev": str(dev_file) if dev_file else None,
        "carved": carved,
        "test": str(test_file) if test_file else None,
        "task": plan.task.description,
        "profile": plan.profile.to_dict(),
        "budget_seconds": window.seconds,
        "wall_seconds": round(time.monotonic() - window.started, 1),
        "metric": plan.metric,
        "direction": plan.mode,
        "prefer": plan.prefer,
        "speed_rows": speed_rows,
        "winner": winner and winner["route"],
        "winner_dir": winner and winner["run_dir"],
        "test_metrics": score.metrics,
        "test_rows": plan.test_rows,
        "test_seconds": score.seconds,
        "test_note": score.note,
        "test_reserve_seconds": round(_test_reserve(rows, plan.test_rows), 1),
        "interrupted": interrupted,
        "rows": _ranked(rows, plan.mode),
    }


def _raise_unless_won(
    result: dict[str, Any], rows: list[dict[str, Any]], out: Path, test_file: Any
) -> None:
    """After the report is written: Ctrl-C, or no route finished, is an error saying what was
    kept."""
    if result["interrupted"]:
        raise AutoInterrupted(_interrupted_message(result, out, test_file))
    if result["winner"] is None:
        tried = "; ".join(f"{r['route']}: {r['status']}" for r in rows if r["status"] != "skipped")
        raise LmadaptError(
            f"no route finished within the budget ({tried or 'none started'}); "
            f"see {out / 'report.md'}"
        )


def _interrupted_message(result: dict[str, Any], out: Path, test_file: Any) -> str:
    """What Ctrl-C kept: there is no resume for auto, so say how to run it again."""
    others = [r["route"] for r in result["rows"] if r["status"] in OK][1:]
    what = (
        f"interrupted; kept in {out}: report.md and leaderboard.json, the best finished route "
        f"({result['winner']}) in {result['winner_dir']}"
    )
    if others:
        what += f", the other finished route(s) in {out / 'routes'} ({', '.join(others)})"
    if test_file is not None and result["test_metrics"] is None:
        what += f"; score it on the test file with: lmadapt eval {result['winner_dir']} {test_file}"
    return what + ". auto does not resume: to run it again, pass --overwrite or another --out"


def _test_reserve(rows: list[dict[str, Any]], test_rows: int) -> float:
    """Seconds kept back for scoring the test file with the winner, whichever finished route it
    turns out to be: the slowest one's measured load time and predict speed, 10% spare."""
    if not test_rows:
        return 0.0
    costs = [
        r["load_seconds"] + test_rows / r["predict_per_second"]
        for r in rows
        if r.get("status") in OK and r["predict_per_second"]
    ]
    return 1.1 * max(costs, default=0.0)


def _run_routes(
    plan: Plan, out: Path, end: float, speed_file: Path, rows: list[dict[str, Any]]
) -> None:
    """Every route in order, each appended to `rows`: skipped with its reason, or run within its
    share of what is left (what is left divided among the fitting routes still to run). What is
    left excludes the time scoring the test file would take with any route finished so far, so
    the whole command, test included, fits the budget. A route is stopped where its share ends,
    whatever it is doing (a later, slower route can still leave too little time for the test
    file: it is then not scored). Ctrl-C stops them, the running route's directory removed."""
    fitting = fitting_routes(plan)
    for entry in ROUTES:
        name, route = entry.name, entry.impl(entry.name)
        row = _row(plan, name, route)
        rows.append(row)
        why = route.unfit(plan)
        if why is not None:
            row.update(status="skipped", reason=why)
            continue
        left = end - time.monotonic() - _test_reserve(rows, plan.test_rows)
        if left < route.min_seconds:
            row.update(
                status="skipped",
                reason=f"{left:.0f}s of the budget left; it needs about {route.min_seconds:.0f}s",
            )
            fitting.remove(name)
            continue
        share = left / len(fitting)
        fitting.remove(name)
        run_dir = out / "routes" / name
        print(f"[auto] {name}: up to {share:.0f}s ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        deadline = Deadline(
            t0 + share * (1 - RESERVE) if route.trains else -math.inf,
            end=t0 + share,
            started=t0,
            after=SPEED_SHARE * share,
        )
        load = speed = None
        try:
            with time_limit(t0 + share):
                route.run(plan, run_dir, deadline)
                load, speed = _predict_speed(run_dir, speed_file, plan, SPEED_SHARE * share)
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except OutOfTime:
            row.update(status="out of time", reason=f"still running when its {share:.0f}s ran out")
        except (TrainingInterrupted, KeyboardInterrupt):
            _finished(plan, route, row, run_dir, deadline, t0)  # a finished run stays
            raise
        except Exception as e:  # one failing route must not lose the others
            first = (str(e).splitlines() or [""])[0]
            row.update(status="failed", reason=f"{type(e).__name__}: {first}")
            write_text(out / "routes" / f"{name}.error.txt", traceback.format_exc())
        if "status" in row:  # said where the run is watched, not only in the report
            print(f"[auto] {name}: {row['status']}: {row['reason']}", file=sys.stderr, flush=True)
        if row.get("status") == "failed" and RunDir(run_dir).metrics.is_file():
            continue  # it finished, then did not reload: kept for a look, not ranked
        if row.get("status") in ("skipped", "failed"):
            shutil.rmtree(run_dir, ignore_errors=True)  # unfinished: nothing half-written stays
            continue
        if not _finished(plan, route, row, run_dir, deadline, t0, load, speed):
            continue
        print(
            f"[auto] {name}: dev {plan.metric} {row['dev_metric']:.4f} ({row['wall_seconds']}s)",
            file=sys.stderr,
            flush=True,
        )


def _finished(
    plan: Plan,
    route: Route,
    row: dict[str, Any],
    run_dir: Path,
    deadline: Deadline,
    t0: float,
    load: float | None = None,
    speed: float | None = None,
) -> bool:
    """Record a route whose run finished (its metrics.json written) in its leaderboard row,
    and whether it had; a run that had not finished is removed, nothing half-written stays.
    A run stopped (Ctrl-C, its time) after it finished is kept, its speed unmeasured."""
    try:
        metrics = json.loads(RunDir(run_dir).metrics.read_text(encoding="utf-8"))
    except FileNotFoundError:
        shutil.rmtree(run_dir, ignore_errors=True)
        return False
    stopped = deadline.fired and metrics["steps"] > 0
    row.update(
        status="stopped at its time share" if stopped else "done",
        reason="" if speed is not None else "speed not measured: stopped before it was",
        run_dir=str(run_dir),
        dev_metric=metrics["dev"][plan.metric],
        dev_loss=metrics["dev"].get("loss"),  # distillation reports none
        dev_rows=deadline.dev_rows,
        steps=metrics["steps"],
        train_seconds=metrics["train_seconds"],
        predict_per_second=None if speed is None else round(speed, 1),
        load_seconds=None if load is None else round(load, 1),
        favoured=route.favoured(plan),
        size_mb=round(dir_bytes(RunDir(run_dir).model) / 2**20, 2),
        wall_seconds=round(time.monotonic() - t0, 1),
    )
    plan.done.append(row)
    return True


def _row(plan: Plan, name: str, route: Route) -> dict[str, Any]:
    return {
        "route": name,
        "model": plan.models.get(name, route.model),
        "method": route.method,
        "teaches": route.teaches,
    }


def _not_run(plan: Plan, rows: list[dict[str, Any]]) -> None:
    """After Ctrl-C: the route it stopped is 'interrupted', those after it 'not run'."""
    for row in rows:
        row.setdefault("status", "interrupted")
        row.setdefault("reason", "Ctrl-C")
    for entry in list(ROUTES)[len(rows) :]:
        rows.append(
            {
                **_row(plan, entry.name, entry.impl(entry.name)),
                "status": "not run",
                "reason": "Ctrl-C",
            }
        )


def _predict_speed(
    run_dir: Path, speed_file: Path, plan: Plan, seconds: float
) -> tuple[float, float]:
    """(seconds to load the run, examples per second of prediction on the speed file,
    tokenisation included, loading excluded); loading also proves the run reloads. One batch
    (the run's eval_batch_size) at a time, until the file is done or `seconds` have passed."""
    t0 = time.perf_counter()
    run = load_run(run_dir, plan.device)
    t1 = time.perf_counter()
    examples = run.task.read(str(speed_file), plan.fmt, labelled=False)
    batch = run.config.train.eval_batch_size
    done = 0
    while done < len(examples) and (not done or time.perf_counter() - t1 < seconds):
        part = examples[done : done + batch]
        run.task.predict_model(run.model, run.encoded(part))
        done += len(part)
    return t1 - t0, done / max(time.perf_counter() - t1, 1e-9)


def _ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    ok = [r for r in rows if r["status"] in OK]
    ranked = []
    while ok:
        top = best(ok, mode)
        ok.remove(top)
        ranked.append(top)
    return ranked + [r for r in rows if r["status"] not in OK]


def markdown(result: dict[str, Any], plan: Plan) -> str:
    """report.md: the data and budget, the leaderboard, the winner's test score and how to use
    it."""
    lines = [
        *_overview(result, plan),
        *_section("Leaderboard", [_leaderboard_table(result), *_notes(result)]),
        *_test_section(result),
        *_use_winner(result),
    ]
    return "\n".join(lines) + "\n"


def _section(title: str, body: list[str]) -> list[str]:
    """A report.md section: a blank line, its heading, a blank line, its lines."""
    return ["", f"## {title}", "", *body]


def _overview(result: dict[str, Any], plan: Plan) -> list[str]:
    """The bullet list at the top: data, dev split, selection, budget, outcome."""
    p = result["profile"]
    counts = ", ".join(f"{k} {v:,}" for k, v in p["label_counts"].items())
    per_label = f" ({'few' if plan.few else 'many'} per label: {counts})" if counts else ""
    dev = (
        f"`{result['dev']}`"
        if result["dev"]
        else f"carved from train, stratified: {result['carved']['dev']:,} examples "
        f"(train keeps {result['carved']['train']:,}; `data/`)"
    )
    lines = [
        "# lmadapt auto",
        "",
        f"- **data**: `{result['train']}`, {result['task']}, {p['examples']:,} training examples"
        f"{per_label}; {p['mean_words']} words on average, {p['max_words']} at most",
        f"- **dev**: {dev}",
        f"- **selection**: dev {result['metric']} ({result['direction']}); test never read for it",
        f"- **budget**: {result['budget_seconds']:.0f}s, used {result['wall_seconds']:.0f}s"
        + _test_time(result)
        + f"; prefer {result['prefer']}",
    ]
    if result["interrupted"]:
        lines.append("- **interrupted** (Ctrl-C): the routes that had finished are ranked below")
    if result["winner"]:
        lines.append(f"- **winner**: {result['winner']} -> `{result['winner_dir']}`")
    if result["test_note"]:
        lines.append(f"- **test** (`{result['test']}`): {result['test_note']}")
    return lines


def _leaderboard_table(result: dict[str, Any]) -> str:
    """One row per route: finished ones ranked with their measures, the others with why."""
    rows = []
    for i, r in enumerate(result["rows"], 1):
        if r["status"] in OK:
            rows.append(
                [
                    i,
                    r["route"],
                    r["model"],
                    r["method"],
                    _dev(r),
                    f"{r['train_seconds']:.0f}s ({r['steps']} steps)",
                    "-" if r["predict_per_second"] is None else f"{r['predict_per_second']:.1f}",
                    f"{r['size_mb']:.1f}",
                    r["status"],
                ]
            )
        else:
            rows.append(["-", r["route"], r["model"], r["method"], "-", "-", "-", "-", _status(r)])
    return markdown_table(
        [
            "rank",
            "route",
            "model",
            "method",
            f"dev {result['metric']}",
            "train time",
            "predict ex/s",
            "size MB",
            "status",
        ],
        rows,
    )


def _notes(result: dict[str, Any]) -> list[str]:
    """How the leaderboard's speed, size and partial dev metrics were measured."""
    lines = [
        "",
        "Predict speed: `lmadapt predict` on "
        f"{result['speed_rows']} dev examples, tokenisation included, loading excluded. Size: "
        "the run's "
        "model/ directory (an adapter with its base named, or every weight).",
    ]
    if any(r.get("dev_rows") for r in result["rows"]):
        lines += [
            "",
            "A dev metric marked `n of N` was measured on a random n of the N dev examples: "
            "scoring all of them would not fit in the route's share of the budget.",
        ]
    return lines


def _test_section(result: dict[str, Any]) -> list[str]:
    if not result["test_metrics"]:
        return []
    t = result["test_metrics"]
    table = markdown_table(list(t), [[f"{v:.4f}" for v in t.values()]])
    return _section(f"Winner on test (`{result['test']}`)", [table])


def _use_winner(result: dict[str, Any]) -> list[str]:
    if not result["winner"]:
        return []
    w = result["winner_dir"]
    commands = [
        f'lmadapt predict {w} "some text"',
        f"lmadapt serve {w}",
        f"lmadapt export {w} --merge {w}-merged",
    ]
    return _section("Use the winner", ["```", *commands, "```"])


def _dev(row: dict[str, Any]) -> str:
    part = row.get("dev_rows")
    return f"{row['dev_metric']:.4f}" + (f" ({part[0]:,} of {part[1]:,})" if part else "")


def _status(row: dict[str, Any]) -> str:
    reason = row["reason"].replace("|", "/")
    return f"{row['status']}: {reason}"


def _test_time(result: dict[str, Any]) -> str:
    if result["test_metrics"] is None:
        return ""
    return (
        f" (scoring {result['test_rows']:,} test examples with the winner took "
        f"{result['test_seconds']:.0f}s of it; {result['test_reserve_seconds']:.0f}s were kept "
        "back for it)"
    )
