"""`lmadapt auto` on the issue's four data sets (#19), each under its budget. Writes
bench/results/auto_runs.{json,md}.

    python -m bench.auto_runs [--budget 10m] [--only sst2_16 sst2_2000 sst2_all conll]

SST-2 (../shared/data/sst2, not committed): 16 examples per class and 2,000 rows (both drawn
stratified with seed 0 by the bench, written under --work), and all 67,349 rows; SST-2 dev (872)
is the test set, scored for the winner only; the dev set is carved from train by auto. The
prompting routes get `--template sentiment` (SST-2's labels are 0/1, which are not words).
CoNLL-2003: train, valid as dev, test. Each run is `lmadapt auto` in its own process, one after
another; the figures are read back from its leaderboard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
SST2 = DATA / "sst2"
CONLL = DATA / "conll2003"


def sst2_subset(work: Path, per_class: int | None, rows: int | None) -> Path:
    """SST-2 train rows drawn with seed 0: `per_class` of each label, or `rows` stratified."""
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, body = lines[0], lines[1:]
    by_label: dict[str, list[str]] = {}
    for line in body:
        by_label.setdefault(line.rsplit("\t", 1)[1], []).append(line)
    rng = random.Random(0)
    picked = []
    for _, group in sorted(by_label.items()):
        k = per_class if per_class else round(rows * len(group) / len(body))
        picked += rng.sample(group, k)
    rng.shuffle(picked)
    path = work / f"sst2_{per_class or rows}.tsv"
    path.write_text("\n".join([header, *picked]) + "\n", encoding="utf-8")
    return path


def runs(work: Path) -> dict[str, list[str]]:
    """Name -> the auto command's arguments after `lmadapt auto`."""
    sst2 = ["--test", str(SST2 / "dev.tsv"), "--template", "sentiment"]
    return {
        "sst2_16": [str(sst2_subset(work, 16, None)), *sst2],
        "sst2_2000": [str(sst2_subset(work, None, 2000)), *sst2],
        "sst2_all": [str(SST2 / "train.tsv"), *sst2],
        "conll": [
            str(CONLL / "train.txt"),
            str(CONLL / "valid.txt"),
            "--test",
            str(CONLL / "test.txt"),
        ],
    }


def summary(board: dict) -> dict:
    keep = (
        "route",
        "model",
        "method",
        "status",
        "reason",
        "dev_metric",
        "steps",
        "train_seconds",
        "predict_per_second",
        "size_mb",
        "wall_seconds",
    )
    return {
        **{
            k: board[k]
            for k in (
                "budget_seconds",
                "wall_seconds",
                "metric",
                "winner",
                "test_metrics",
                "test_rows",
                "test_seconds",
                "test_reserve_seconds",
                "carved",
            )
        },
        "rows": [{k: r[k] for k in keep if k in r} for r in board["rows"]],
    }


def markdown(results: dict) -> str:
    out = []
    for name, r in results["runs"].items():
        test = r["test_metrics"] or {}
        out += [
            f"## {name}",
            "",
            f"`{r['command']}`: budget {r['budget_seconds']:.0f}s, process wall "
            f"{r['process_seconds']:.0f}s; winner **{r['winner']}**, test "
            f"{r['metric']} {test.get(r['metric'], float('nan')):.4f} on {r['test_rows']:,} "
            "examples "
            f"(scoring took {r['test_seconds'] or 0:.0f}s)",
            "",
            "| route | model | method | status | dev | steps | train s | predict ex/s | MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            dev = f"{row['dev_metric']:.4f}" if "dev_metric" in row else "-"
            status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
            out.append(
                f"| {row['route']} | {row['model']} | {row['method']} | {status} | {dev} | "
                f"{row.get('steps', '-')} | {row.get('train_seconds', '-')} | "
                f"{row.get('predict_per_second', '-')} | {row.get('size_mb', '-')} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="10m")
    p.add_argument("--only", nargs="*")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmadapt-auto-runs"))
    p.add_argument("--results", type=Path, default=RESULTS, help="where auto_runs.json goes")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    out_json = args.results / "auto_runs.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    results["machine"] = machine_info()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "LMADAPT_TENSORBOARD": "0"}
    for name, argv in runs(args.work).items():
        if args.only and name not in args.only:
            continue
        out = args.work / name
        cmd = [
            sys.executable,
            "-m",
            "lmadapt",
            "auto",
            *argv,
            "--budget",
            args.budget,
            "--out",
            str(out),
            "--overwrite",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        board = json.loads((out / "leaderboard.json").read_text())
        shown = " ".join(["lmadapt auto", *argv, "--budget", args.budget]).replace(
            str(DATA), "../shared/data"
        )
        results["runs"][name] = {
            "command": shown,
            "process_seconds": round(wall, 1),
            **summary(board),
        }
        print(name, board["winner"], board["test_metrics"], round(wall, 1), flush=True)
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        (args.results / "auto_runs.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
