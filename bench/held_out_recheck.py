"""Re-measure a subset of the held-out (dev/test) figures in bench/results, through the original
scripts' own scenario builders and runners, and set them beside the stored values (#30).

    .venv/bin/python -m bench.held_out_recheck [--only lora,ner] [--keep-cache]

Stored values are read from bench/results/*.json when this runs; runs are seeded, so they should
reproduce (nearly) exactly. Every run gets a fresh feature cache (LMADAPT_CACHE in a temporary
directory) unless --keep-cache, so the encoding is re-done by the current code too. Writes
bench/results/held_out_recheck.{json,md} only; wall times here are not speed figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass
class Check:
    name: str
    source: str  # bench/results file holding the stored figure(s)
    command: str  # the original's command
    stored: Callable[[dict], dict[str, float]]  # the source's JSON -> figure -> value
    measure: Callable[[Path], dict[str, float]]  # a temporary directory -> figure -> value


def dropout_checks() -> list[Check]:
    from bench import dropout_default as dd

    def check(name: str, short: str) -> Check:
        def stored(js: dict) -> dict[str, float]:
            row = next(r for r in js[name]["model"] if r["seed"] == 0)
            return {k: v for k, v in row.items() if k.endswith("accuracy")}

        def measure(tmp: Path) -> dict[str, float]:
            model_dropout = dd.CHOICES["dropout"].arms["model"]
            row = dd.measure(name, dd.scenarios(tmp, 0)[name], 0, model_dropout, tmp / "run")
            return {k: v for k, v in row.items() if k.endswith("accuracy")}

        cmd = "python -m bench.dropout_default --seeds 0"
        return Check(f"dropout_default: {short}", "dropout_default.json", cmd, stored, measure)

    return [
        check("classification, MiniLM lora, 2000 rows", "SUBJ MiniLM lora, model's dropout"),
        check("classification, MiniLM full, 2000 rows", "SUBJ MiniLM full, model's dropout"),
        check(
            "few-shot prompt FT, SmolLM2 lora, 16/class",
            "few-shot prompt FT SmolLM2 16/class, model's dropout",
        ),
    ]


def train_speed_checks() -> list[Check]:
    from bench.__main__ import command, run, scenarios

    def check(s: dict) -> Check:
        def stored(js: dict) -> dict[str, float]:
            row = next(r for r in js["results"] if r["name"] == s["name"])
            return {"dev_accuracy": row["dev_accuracy"]}

        def measure(tmp: Path) -> dict[str, float]:
            r = run(s)
            if "error" in r:
                raise RuntimeError(f"{s['name']}: {r['error']}")
            return {"dev_accuracy": r["dev_accuracy"]}

        cmd = "python -m bench, this row as: python " + shlex.join(command(s)[1:])
        return Check(f"train_speed: {s['name']}", "train_speed.json", cmd, stored, measure)

    wanted = ("lora/lmadapt", "bitfit/lmadapt", "full/lmadapt")
    # `python -m bench`'s defaults: 4,000 SST-2 rows, no full-SST-2 row, 128 instruct rows
    return [check(s) for s in scenarios(4000, None, 128) if s["name"] in wanted]


def ner_checks() -> list[Check]:
    from bench import ner_side_by_side as ner

    name = "lmadapt defaults"

    def stored(js: dict) -> dict[str, float]:
        f1 = js["runs"][name]["dev_f1_by_epoch"]
        return {f"dev_f1 epoch {i + 1}": v for i, v in enumerate(f1)}

    def measure(tmp: Path) -> dict[str, float]:
        # a fresh `out`: run_lmadapt reads back a finished run found there instead of training
        train = ner.write_sample(3400, tmp)
        out = tmp / f"run_{1 + list(ner.VARIANTS).index(name)}_seed42"
        f1 = ner.run_lmadapt(train, 3, ner.VARIANTS[name], out, 42)["dev_f1_by_epoch"]
        return {f"dev_f1 epoch {i + 1}": v for i, v in enumerate(f1)}

    cmd = "python -m bench.ner_side_by_side --only 'lmadapt defaults'"
    return [Check(f"ner_side_by_side: {name}", "ner_side_by_side.json", cmd, stored, measure)]


def zero_shot_checks() -> list[Check]:
    from bench import zero_shot as zs

    def check(name: str, n: int) -> Check:
        def stored(js: dict) -> dict[str, float]:
            return dict(js["sets"][name]["accuracy"])

        def measure(tmp: Path) -> dict[str, float]:
            return dict(zs.measure(name, n)["accuracy"])

        cmd = f"python -m bench.zero_shot --n {n} --sets {name}"
        return Check(f"zero_shot: {name}", "zero_shot.json", cmd, stored, measure)

    return [check("subj", 2000), check("sst2", 872)]


def prompt_ft_checks() -> list[Check]:
    """The first seed at 16 and at 64 per class, both tasks (each figure stored is a mean of 3
    seeds; its runs are kept, seed 0 first)."""
    from bench import prompt_ft_vs_head as pf

    def check(per_class: int) -> Check:
        def stored(js: dict) -> dict[str, float]:
            return {f"{t}_{per_class} seed 0": js[f"{t}_{per_class}"]["runs"][0] for t in pf.TASKS}

        def measure(tmp: Path) -> dict[str, float]:
            res = pf.main(["--per-class", str(per_class), "--seeds", "0", "--out", str(tmp)])
            return {f"{t}_{per_class} seed 0": res[f"{t}_{per_class}"]["runs"][0] for t in pf.TASKS}

        cmd = "python -m bench.prompt_ft_vs_head --per-class 16 64 --seeds 0 1 2 --method lora"
        name = f"prompt_ft_vs_head: {per_class} per class"
        return Check(name, "prompt_ft_vs_head.json", cmd, stored, measure)

    return [check(16), check(64)]


def auto_checks() -> list[Check]:
    """`lmadapt auto` on each stored data set: each route's dev figure and the winner's test
    figure. sst2_16's step counts are fixed by the plan; the others are bound by the budget, so
    they hold only on an idle machine like the one that stored them."""
    from bench import auto_runs

    def figures(run: dict) -> dict[str, float]:
        out = {f"{r['route']} dev": r["dev_metric"] for r in run["rows"] if "dev_metric" in r}
        out[f"winner ({run['winner']}) test"] = run["test_metrics"][run["metric"]]
        return out

    def check(name: str) -> Check:
        def stored(js: dict) -> dict[str, float]:
            return figures(js["runs"][name])

        def measure(tmp: Path) -> dict[str, float]:
            auto_runs.main(["--only", name, "--work", str(tmp), "--results", str(tmp)])
            return figures(json.loads((tmp / "auto_runs.json").read_text())["runs"][name])

        cmd = f"python -m bench.auto_runs --only {name}"
        return Check(f"auto_runs: {name}", "auto_runs.json", cmd, stored, measure)

    return [check(n) for n in ("sst2_16", "sst2_2000", "sst2_all", "conll")]


def _commit() -> str:
    """The checkout's commit (what code measured); BENCH_COMMIT names it for a snapshot copy
    outside git (a long run must not pick up edits made to the checkout while it runs)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or os.environ.get("BENCH_COMMIT", "")


def markdown(doc: dict) -> str:
    lines = [
        f"Last run {doc['measured_at']}: `{doc['command']}` ({doc['note']}); each row says when "
        "and at which commit it was measured.",
        "",
        "| figure | metric | stored | re-measured | difference | measured | original command |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['check']} | | | error: {r['error']} | | | `{r['command']}` |")
            continue
        for metric, stored in r["stored"].items():
            new = r["measured"].get(metric)
            got = "missing" if new is None else f"{new:.4f}"
            diff = "" if new is None else f"{new - stored:+.4f}"
            when = f"{r.get('measured_at', '')} {r.get('commit', '')}".strip()
            lines.append(
                f"| {r['check']} | {metric} | {stored:.4f} | {got} | {diff} | {when} | "
                f"`{r['command']}` |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of check names")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the feature cache")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    checks = [
        c
        for c in dropout_checks()
        + train_speed_checks()
        + ner_checks()
        + zero_shot_checks()
        + prompt_ft_checks()
        + auto_checks()
        if not a.only or any(k in c.name for k in a.only.split(","))
    ]
    out_json = RESULTS / "held_out_recheck.json"
    # a partial run (--only) replaces its rows and keeps the others' earlier ones
    kept = json.loads(out_json.read_text())["rows"] if a.only and out_json.exists() else []
    fresh: dict[str, dict] = {}
    start = time.perf_counter()
    for c in checks:
        print(f"== {c.name}", flush=True)
        stored = c.stored(json.loads((RESULTS / c.source).read_text()))
        row: dict = {"check": c.name, "source": f"bench/results/{c.source}", "command": c.command}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="held-out-") as tmp:
            if not a.keep_cache:
                os.environ["LMADAPT_CACHE"] = str(Path(tmp) / "cache")
            try:
                measured = c.measure(Path(tmp))
            except Exception as e:  # noqa: BLE001 - recorded; the other checks still run
                row["error"] = f"{type(e).__name__}: {e}"
                measured = {}
        row.update(
            measured_at=time.strftime("%Y-%m-%d %H:%M"),
            commit=_commit(),
            stored=stored,
            measured=measured,
            difference={k: measured[k] - v for k, v in stored.items() if k in measured},
            wall_seconds=round(time.perf_counter() - t0, 1),
        )
        fresh[c.name] = row
        print(json.dumps(row), flush=True)
    rows = [r for r in kept if r["check"] not in fresh] + list(fresh.values())
    doc = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join(["python", "-m", "bench.held_out_recheck", *(argv or sys.argv[1:])]),
        "note": "accuracy checks: wall times are not speed figures (budget-bound sets run alone)",
        "wall_seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "held_out_recheck.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
