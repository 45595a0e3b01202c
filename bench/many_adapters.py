"""Many adapters, one server: `lmadapt serve --runs-dir` over 20 LoRA runs of one base.

    python -m bench.many_adapters --run RUN_DIR [--adapters 20] [--seconds 15]

The 20 runs are copies of RUN (a LoRA run) whose adapter weights (LoRA matrices and trained
head) are each scaled by their own random factors: adapters of a real run's shape, size and
cost, that answer differently. One server process (`--runs-dir`, nothing loaded at start) is
measured by its resident memory (VmRSS, /proc) after start-up, after the first run, and with all
runs loaded; beside it, RUN served alone (`lmadapt serve RUN`), the memory one run costs in a
process of its own. Latency, one request of one text at a time: the first request to each run
(cold: it loads), then warm requests round-robin over all runs; then 8 client threads on
random runs for --seconds. Last, with a memory budget of the base and 4 adapters, requests
cycling over all runs (each one loads again after being unloaded). Writes
bench/results/many_adapters.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.load_test import (
    REQUEST_TIMEOUT,
    free_port,
    host,
    sample_texts,
    start_server,
    stop_server,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def variants(run: Path, out: Path, n: int) -> list[str]:
    """`n` copies of `run` with adapter weights scaled per copy (see the module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    names = []
    for i in range(n):
        copy = Path(shutil.copytree(run, out / f"adapter{i:02d}", ignore=_checkpoints))
        weights = copy / "model" / "adapter_model.safetensors"
        g = torch.Generator().manual_seed(i)
        tensors = load_file(weights)
        save_file(
            {k: v * (1 + 0.5 * torch.randn(v.shape, generator=g)) for k, v in tensors.items()},
            weights,
        )
        names.append(copy.name)
    return names


def _checkpoints(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("checkpoints", "plots")]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for {pid}")


def server(args: list[str], port: int, log: Path) -> Any:
    cmd = [sys.executable, "-m", "lmadapt", "serve", *args, "--port", str(port)]
    return start_server([*cmd, "--log-level", "warning", "--device", "cpu"], port, log)


def ask(http: httpx.Client, base: str, model: str, text: str) -> float:
    """One request; its latency in ms."""
    t0 = time.perf_counter()
    r = http.post(f"{base}/v1/classify", json={"model": model, "texts": [text]})
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def summary(ms: list[float]) -> dict[str, float]:
    a = np.array(ms)
    return {
        "requests": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def concurrent(
    base: str, names: list[str], texts: list[str], clients: int, seconds: float
) -> dict[str, Any]:
    lat: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            while time.monotonic() < deadline:
                lat[i].append(ask(http, base, rng.choice(names), rng.choice(texts)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = [x for per in lat for x in per]
    return {
        "clients": clients,
        "requests_per_second": round(len(ms) / (time.monotonic() - t0), 1),
        **summary(ms),
    }


def health(http: httpx.Client, base: str) -> dict[str, Any]:
    return http.get(f"{base}/health").json()


def measure_dir(root: Path, names: list[str], port: int, log: Path, args: Any) -> dict[str, Any]:
    """The --runs-dir server: memory as runs load, cold and warm latency, 8 clients."""
    texts = sample_texts()
    base = f"http://127.0.0.1:{port}"
    proc = server(["--runs-dir", str(root)], port, log)
    try:
        memory = {"started": rss_mb(proc.pid)}
        cold: list[float] = []
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            for i, name in enumerate(names):
                cold.append(ask(http, base, name, texts[i]))
                if i == 0:
                    memory["one_run_loaded"] = rss_mb(proc.pid)
                    one = health(http, base)
            memory["all_runs_loaded"] = rss_mb(proc.pid)
            every = health(http, base)
            warm = [
                ask(http, base, name, texts[(r * len(names) + i) % len(texts)])
                for r in range(args.warm_rounds)
                for i, name in enumerate(names)
            ]
            load = concurrent(base, names, texts, 8, args.seconds)
            memory["after_8_clients"] = rss_mb(proc.pid)
            memory["peak"] = rss_mb(proc.pid, "VmHWM")
            final = health(http, base)
    finally:
        stop_server(proc)
    adapter = (every["weights_mb"] - one["weights_mb"]) / (len(names) - 1)
    return {
        "memory_rss_mb": memory,
        "weights_mb": {
            "one_run": one["weights_mb"],
            "all_runs": every["weights_mb"],
            "per_adapter": round(adapter, 2),
            "base": round(one["weights_mb"] - adapter, 1),
        },
        "server": {
            k: final[k]
            for k in ("base_models_in_memory", "loads", "unloads", "batches", "mixed_batches")
        },
        "latency_ms": {
            "cold_first_run": round(cold[0], 1),
            "cold_other_runs": summary(cold[1:]),
            "warm_round_robin": summary(warm),
            "warm_8_clients_random_runs": load,
        },
    }


def measure_budget(
    root: Path, names: list[str], port: int, log: Path, budget_mb: float
) -> dict[str, Any]:
    """With room for the base and 4 adapters: requests cycling over every run, twice."""
    texts = sample_texts()
    base = f"http://127.0.0.1:{port}"
    proc = server(["--runs-dir", str(root), "--memory-budget-mb", f"{budget_mb:.3f}"], port, log)
    try:
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            ms = [ask(http, base, name, texts[i]) for i in range(2) for name in names]
            h = health(http, base)
        rss = rss_mb(proc.pid)
    finally:
        stop_server(proc)
    return {
        "budget_mb": round(budget_mb, 2),
        "latency_ms": summary(ms[1:]),
        "rss_mb": rss,
        "server": {k: h[k] for k in ("loaded", "loads", "unloads", "weights_mb")},
    }


def markdown(r: dict[str, Any]) -> str:
    d = r["runs_dir"]
    m, w, lat = d["memory_rss_mb"], d["weights_mb"], d["latency_ms"]
    n = r["adapters"]
    lines = [
        "# Many adapters, one server",
        "",
        f"`{r['command']}`: {n} LoRA runs of one base under `lmadapt serve --runs-dir`.",
        "",
        "| resident memory (VmRSS) | MB |",
        "|---|---:|",
        f"| one run served alone (its own process) | {r['one_run_alone_rss_mb']} |",
        f"| --runs-dir server, nothing loaded | {m['started']} |",
        f"| --runs-dir server, 1 run loaded | {m['one_run_loaded']} |",
        f"| --runs-dir server, all {n} runs loaded | {m['all_runs_loaded']} |",
        f"| {n} runs in {n} processes (1 run alone x {n}) | {n * r['one_run_alone_rss_mb']:.1f} |",
        "",
        f"Weights the server holds: base {w['base']} MB + {w['per_adapter']} MB per adapter "
        f"({w['all_runs']} MB with all {n}); base models in memory: "
        f"{d['server']['base_models_in_memory']}.",
        "",
        "| latency, one text per request | requests | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        "| cold: first request of the first run (loads the base) | 1 "
        f"| {lat['cold_first_run']} | | |",
    ]
    for label, s in (
        ("cold: first request of each other run (loads its adapter)", lat["cold_other_runs"]),
        ("warm: round-robin over all runs, one client", lat["warm_round_robin"]),
        ("warm: one run served alone (its own process), one client", r["one_run_alone_warm_ms"]),
    ):
        lines.append(
            f"| {label} | {s['requests']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |"
        )
    c = lat["warm_8_clients_random_runs"]
    lines.append(
        f"| warm: 8 clients, random runs ({c['requests_per_second']} req/s) | {c['requests']} "
        f"| {c['p50_ms']} | {c['p99_ms']} | {c['max_ms']} |"
    )
    b = r["budget"]
    s = b["latency_ms"]
    lines.append(
        f"| budget of base + 4 adapters ({b['budget_mb']} MB), cycling over all runs "
        f"({b['server']['unloads']} unloads) | {s['requests']} | {s['p50_ms']} | {s['p99_ms']} "
        f"| {s['max_ms']} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.many_adapters", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", required=True, type=Path, help="a finished LoRA classification run")
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--warm-rounds", type=int, default=5, help="warm requests per run")
    p.add_argument("--out", type=Path, default=RESULTS / "many_adapters.json")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "command": "python -m bench.many_adapters "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "run": str(args.run),
        "adapters": args.adapters,
        "machine": host(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        root.mkdir()
        names = variants(args.run, root, args.adapters)
        port = free_port()
        proc = server([str(root / names[0])], port, Path(tmp) / "alone.log")
        try:
            texts = sample_texts()
            with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
                ask(http, f"http://127.0.0.1:{port}", names[0], "a warm film")
                alone = [
                    ask(http, f"http://127.0.0.1:{port}", names[0], texts[i % len(texts)])
                    for i in range(args.warm_rounds * len(names))
                ]
            report["one_run_alone_rss_mb"] = rss_mb(proc.pid)
            report["one_run_alone_warm_ms"] = summary(alone)
        finally:
            stop_server(proc)
        report["runs_dir"] = measure_dir(root, names, free_port(), Path(tmp) / "dir.log", args)
        w = report["runs_dir"]["weights_mb"]
        budget = w["base"] + 4.5 * w["per_adapter"]
        report["budget"] = measure_budget(
            root, names, free_port(), Path(tmp) / "budget.log", budget
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
