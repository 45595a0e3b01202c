"""`lmadapt auto`: the budget, the routes run one after the other, the winner and the report."""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Literal

from lmadapt.api import evaluate, load_run, predict
from lmadapt.auto.plan import Plan, make_plan
from lmadapt.auto.routes import OK, ROUTES, Skip, best, fitting_routes
from lmadapt.compare import dir_bytes
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluate.report import markdown_table
from lmadapt.io import write_json, write_text
from lmadapt.rundir import check_output_dir
from lmadapt.session import run_directory
from lmadapt.train.loop import TrainingInterrupted

RESERVE = 0.25
"""Share of a route's time kept for loading, the final evaluation and the speed probe."""
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(f"(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s?)?")
"""Hours, minutes, seconds, each optional and in that order: 90s, 10m, 1h30m, 45."""


def parse_budget(budget: str | float) -> float:
    """Seconds in a budget: a number of seconds or a duration like '90s', '10m', '1h', '1h30m'."""
    if isinstance(budget, (int, float)):
        seconds = float(budget)
    else:
        match = _DURATION.fullmatch(budget.replace(" ", "").lower())
        if match is None or not any(match.groups()):
            raise ConfigError("--budget", f"expected e.g. 90s, 10m, 1h or 1h30m, got {budget!r}")
        h, m, s = (float(g or 0) for g in match.groups())
        seconds = 3600 * h + 60 * m + s
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError("--budget", f"must be a positive duration, got {budget!r}")
    return seconds


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
) -> dict[str, Any]:
    """Run the routes that fit the data within `budget`, keep the best by dev metric in
    OUT/winner (an ordinary run directory) and write report.md and leaderboard.json to `out`;
    returns the leaderboard. `models` maps route names to models replacing their defaults;
    `template`/`verbalizer` give the prompting routes their words (see `prompt_recipe`)."""
    seconds = parse_budget(budget)
    started = time.monotonic()
    end = started + seconds
    if prefer not in ("accuracy", "speed"):
        raise ConfigError("--prefer", f"must be accuracy or speed, got {prefer!r}")
    unknown = sorted(set(models or {}) - set(ROUTES.names()))
    if unknown:
        raise ConfigError("models", f"unknown route(s) {unknown}; one of {ROUTES.names()}")
    for path in (train_file, dev_file, test_file):
        if path is not None and not Path(path).is_file():
            raise DataError(str(path), "no such file")
    out = check_output_dir(out, overwrite, "--out", "--overwrite", "--overwrite")
    with run_directory(out, "auto"):
        plan, carved, speed_file = make_plan(
            train_file,
            dev_file,
            out,
            fmt=fmt,
            task=task,
            template=template,
            verbalizer=verbalizer,
            prefer=prefer,
            seed=seed,
            device=device,
            models=models or {},
        )
        t, profile, metric, mode = plan.task, plan.profile, plan.metric, plan.mode
        speed_rows = len(plan.task.read(str(speed_file), fmt, labelled=False))
        test_rows = len(t.read(str(test_file), fmt, labelled=False)) if test_file else 0
        rows = _run_routes(plan, out, end, speed_file, test_rows)
        ok = [r for r in rows if r["status"] in OK]
        winner = best(ok, mode) if ok else None
        test = test_seconds = None
        if winner is not None:
            dest = out / "winner"
            shutil.move(winner["run_dir"], dest)
            winner["run_dir"] = str(dest)
            if test_file is not None:
                t0 = time.monotonic()
                test = evaluate(dest, test_file, fmt, device)[0].metrics
                test_seconds = round(time.monotonic() - t0, 1)
        result = {
            "train": str(train_file),
            "dev": str(dev_file) if dev_file else None,
            "carved": carved,
            "test": str(test_file) if test_file else None,
            "task": t.description,
            "profile": profile.to_dict(),
            "budget_seconds": seconds,
            "wall_seconds": round(time.monotonic() - started, 1),
            "metric": metric,
            "direction": mode,
            "prefer": prefer,
            "speed_rows": speed_rows,
            "winner": winner and winner["route"],
            "winner_dir": winner and winner["run_dir"],
            "test_metrics": test,
            "test_rows": test_rows,
            "test_seconds": test_seconds,
            "test_reserve_seconds": round(_test_reserve(rows, test_rows), 1),
            "rows": _ranked(rows, mode),
        }
        write_json(out / "leaderboard.json", result)
        write_text(out / "report.md", markdown(result, plan))
    if winner is None:
        raise LmadaptError(f"no route finished within the budget; see {out / 'report.md'}")
    return result


def _test_reserve(rows: list[dict[str, Any]], test_rows: int) -> float:
    """Seconds kept back for scoring the test file with the winner, whichever finished route it
    turns out to be: the slowest one's measured load time and predict speed, 10% spare."""
    if not test_rows:
        return 0.0
    costs = [
        r["load_seconds"] + test_rows / r["predict_per_second"]
        for r in rows
        if r.get("status") in OK
    ]
    return 1.1 * max(costs, default=0.0)


def _run_routes(
    plan: Plan, out: Path, end: float, speed_file: Path, test_rows: int = 0
) -> list[dict[str, Any]]:
    """Every route in order: skipped with its reason, or run within its share of what is left
    (what is left divided among the fitting routes still to run). What is left excludes the
    time scoring `test_rows` test examples would take with any route finished so far, so the
    whole command, test included, fits the budget (a route's own predict speed is known only
    once it has run: a later, slower route can still overrun, by its test time at most)."""
    rows = []
    routes = [(e.name, e.impl(e.name)) for e in ROUTES]
    fitting = fitting_routes(plan)
    for name, route in routes:
        row = {
            "route": name,
            "model": plan.models.get(name, route.model),
            "method": route.method,
            "teaches": route.teaches,
        }
        rows.append(row)
        why = route.unfit(plan)
        if why is not None:
            row.update(status="skipped", reason=why)
            continue
        left = end - time.monotonic() - _test_reserve(rows, test_rows)
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
        try:
            outcome = route.run(plan, run_dir, time.monotonic() + share * (1 - RESERVE))
            load, speed = _predict_speed(run_dir, speed_file, plan.device)  # also: it reloads
        except Skip as e:
            row.update(status="skipped", reason=str(e))
            continue
        except (TrainingInterrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # one failing route must not lose the others
            first = (str(e).splitlines() or [""])[0]
            row.update(status="failed", reason=f"{type(e).__name__}: {first}")
            (out / "routes").mkdir(exist_ok=True)
            write_text(out / "routes" / f"{name}.error.txt", traceback.format_exc())
            continue
        m = outcome.metrics
        row.update(
            status="stopped at its time share" if outcome.budget_stop else "done",
            reason="",
            run_dir=str(run_dir),
            dev_metric=m["dev"][plan.metric],
            dev_loss=m["dev"].get("loss"),  # distillation reports none
            steps=m["steps"],
            train_seconds=m["train_seconds"],
            predict_per_second=round(speed, 1),
            load_seconds=round(load, 1),
            favoured=route.favoured(plan),
            size_mb=round(dir_bytes(run_dir / "model") / 2**20, 2),
            wall_seconds=round(time.monotonic() - t0, 1),
        )
        plan.done.append(row)
        print(
            f"[auto] {name}: dev {plan.metric} {row['dev_metric']:.4f} ({row['wall_seconds']}s)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _predict_speed(run_dir: Path, speed_file: Path, device: str) -> tuple[float, float]:
    """(seconds to load the run, examples per second of `lmadapt predict` on the speed file,
    loading excluded); loading also proves the run reloads."""
    t0 = time.perf_counter()
    loaded = load_run(run_dir, device)
    t1 = time.perf_counter()
    n = len(predict(loaded, file=speed_file))
    return t1 - t0, n / max(time.perf_counter() - t1, 1e-9)


def _ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    ok = [r for r in rows if r["status"] in OK]
    ranked = []
    while ok:
        top = best(ok, mode)
        ok.remove(top)
        ranked.append(top)
    return ranked + [r for r in rows if r["status"] not in OK]


def markdown(result: dict[str, Any], plan: Plan) -> str:
    metric = result["metric"]
    p = result["profile"]
    counts = ", ".join(f"{k} {v:,}" for k, v in p["label_counts"].items())
    dev = (
        f"`{result['dev']}`"
        if result["dev"]
        else f"carved from train, stratified: {result['carved']['dev']:,} examples "
        f"(train keeps {result['carved']['train']:,}; `data/`)"
    )
    lines = [
        "# lmadapt auto",
        "",
        f"- **data**: `{result['train']}`, {result['task']}, {p['examples']:,} training examples "
        f"({'few' if plan.few else 'many'} per label: {counts}); "
        f"{p['mean_words']} words on average, {p['max_words']} at most",
        f"- **dev**: {dev}",
        f"- **selection**: dev {metric} ({result['direction']}); test never read for it",
        f"- **budget**: {result['budget_seconds']:.0f}s, used {result['wall_seconds']:.0f}s"
        + _test_time(result)
        + f"; prefer {result['prefer']}",
    ]
    if result["winner"]:
        lines.append(f"- **winner**: {result['winner']} -> `{result['winner_dir']}`")
    lines += ["", "## Leaderboard", ""]
    rows = []
    for i, r in enumerate(result["rows"], 1):
        if r["status"] in OK:
            rows.append(
                [
                    i,
                    r["route"],
                    r["model"],
                    r["method"],
                    f"{r['dev_metric']:.4f}",
                    f"{r['train_seconds']:.0f}s ({r['steps']} steps)",
                    f"{r['predict_per_second']:.1f}",
                    f"{r['size_mb']:.1f}",
                    r["status"],
                ]
            )
        else:
            rows.append(["-", r["route"], r["model"], r["method"], "-", "-", "-", "-", _status(r)])
    lines.append(
        markdown_table(
            [
                "rank",
                "route",
                "model",
                "method",
                f"dev {metric}",
                "train time",
                "predict ex/s",
                "size MB",
                "status",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Predict speed: `lmadapt predict` on "
        f"{result['speed_rows']} dev examples, tokenisation included, loading excluded. Size: "
        "the run's "
        "model/ directory (an adapter with its base named, or every weight).",
    ]
    if result["test_metrics"]:
        t = result["test_metrics"]
        lines += [
            "",
            f"## Winner on test (`{result['test']}`)",
            "",
            markdown_table(list(t), [[f"{v:.4f}" for v in t.values()]]),
        ]
    if result["winner"]:
        w = result["winner_dir"]
        lines += [
            "",
            "## Use the winner",
            "",
            "```",
            f'lmadapt predict {w} "some text"',
            f"lmadapt serve {w}",
            f"lmadapt export {w} --merge {w}-merged",
            "```",
        ]
    return "\n".join(lines) + "\n"


def _status(row: dict[str, Any]) -> str:
    reason = row["reason"].replace("|", "/")
    return f"{row['status']}: {reason}"


def _test_time(result: dict[str, Any]) -> str:
    if result["test_seconds"] is None:
        return ""
    return (
        f" (scoring {result['test_rows']:,} test examples with the winner took "
        f"{result['test_seconds']:.0f}s of it; {result['test_reserve_seconds']:.0f}s were kept "
        "back for it)"
    )
