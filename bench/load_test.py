"""Load test: `lmadapt serve` (micro-batching) against a one-request-at-a-time baseline.

    python -m bench.load_test --run RUN_DIR --clients 32 --seconds 60

Both servers run in subprocesses on 127.0.0.1 under the same uvicorn and are driven by the same
client: N threads, each posting one text at a time to /v1/classify for T seconds. The baseline
is the plain-transformers way to serve the same model: the LoRA adapter merged into the base
(peft's merge_and_unload, in memory) inside a `pipeline("text-classification")`, one request at
a time. Reports requests/s, p50/p99 latency and errors; writes bench/results/load_test.json and
prints a markdown table. Everything stops by itself: clients at the deadline, servers in
`finally`, start-up after a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "load_test.json"
WORDS = [
    "warm",
    "funny",
    "dull",
    "lifeless",
    "beautifully",
    "acted",
    "film",
    "plot",
    "cast",
    "wastes",
    "a",
    "the",
    "and",
    "mess",
    "its",
    "story",
    "moving",
    "predictable",
    "score",
]
START_TIMEOUT = 300.0
REQUEST_TIMEOUT = 30.0


def sample_texts(n: int = 64, seed: int = 0) -> list[str]:
    """Review-like texts of 4-40 words, so batches hold mixed lengths as real traffic does."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 40))) for _ in range(n)]


# ---------------------------------------------------------------------- the baseline server


def baseline_app(run_dir: str) -> Any:
    """A minimal FastAPI app around a transformers pipeline; it handles one request at a time."""
    from fastapi import FastAPI
    from transformers import pipeline

    from lmadapt.api import load_run

    run = load_run(run_dir)
    model = run.model
    if hasattr(model, "peft_config"):
        if not hasattr(model, "merge_and_unload"):
            raise SystemExit(f"{run_dir}: the baseline needs a mergeable adapter (LoRA) or a model")
        model = model.merge_and_unload()
    pipe = pipeline("text-classification", model=model, tokenizer=run.tokenizer, device="cpu")
    max_length = getattr(run.config.task, "max_length", 128)
    name = Path(run_dir).resolve().name
    app = FastAPI(title="transformers pipeline baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(body: dict[str, Any]) -> dict[str, Any]:
        # Blocking on the event loop on purpose: strictly one request at a time.
        out = pipe(body["texts"], top_k=None, truncation=True, max_length=max_length)
        results = [
            {
                "label": max(rows, key=lambda r: r["score"])["label"],
                "probabilities": {r["label"]: r["score"] for r in rows},
            }
            for rows in out
        ]
        return {"model": name, "results": results}

    return app


# ---------------------------------------------------------------------- processes and clients


def host() -> dict[str, Any]:
    """The machine a serving benchmark ran on, for its JSON."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start `cmd` and wait until GET /health answers; raise with the log tail if it dies."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(
        f"server did not start within {START_TIMEOUT:.0f}s:\n{log.read_text()[-2000:]}"
    )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def drive(url: str, model: str, clients: int, seconds: float, texts: list[str]) -> dict[str, Any]:
    """N client threads post single texts until the deadline; latency of successful calls."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=REQUEST_TIMEOUT) as http:
            while time.monotonic() < deadline:
                body = {"model": model, "texts": [rng.choice(texts)]}
                t0 = time.perf_counter()
                try:
                    ok = http.post(url, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies[i].append(time.perf_counter() - t0)
                else:
                    errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT + 5)
    elapsed = time.monotonic() - t0
    lat = np.array([x for per in latencies for x in per]) * 1000
    return {
        "requests": int(lat.size),
        "errors": sum(errors),
        "seconds": round(elapsed, 2),
        "requests_per_second": round(lat.size / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
        "mean_ms": round(float(lat.mean()), 1) if lat.size else None,
    }


def labels(base: str, model: str, texts: list[str]) -> list[str]:
    """Warm-up call that also records the labels, to check both servers serve the same model."""
    r = httpx.post(
        f"{base}/v1/classify", json={"model": model, "texts": texts}, timeout=REQUEST_TIMEOUT * 4
    )
    r.raise_for_status()
    return [row["label"] for row in r.json()["results"]]


def bench_server(
    name: str, cmd: list[str], port: int, args: argparse.Namespace, texts: list[str]
) -> tuple[dict[str, Any], list[str]]:
    model = Path(args.run).resolve().name
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / f"{name}.log"
        proc = start_server(cmd, port, log)
        try:
            warm = labels(base, model, texts[:16])
            print(f"{name}: {args.clients} clients for {args.seconds:.0f}s ...", file=sys.stderr)
            result = drive(f"{base}/v1/classify", model, args.clients, args.seconds, texts)
            if name == "lmadapt":
                result["server"] = httpx.get(f"{base}/health", timeout=5).json()
        finally:
            stop_server(proc)
    return result, warm


def markdown(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| server | requests/s | p50 ms | p99 ms | requests | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['requests_per_second']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['requests']} | {r['errors']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load_test", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", required=True, help="finished classification run directory")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.baseline_server:  # the child process of the baseline measurement
        import uvicorn

        uvicorn.run(baseline_app(args.run), host="127.0.0.1", port=args.port, log_level="warning")
        return 0

    texts = sample_texts()
    port = free_port()
    ours = [
        sys.executable,
        "-m",
        "lmadapt",
        "serve",
        args.run,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--log-level",
        "warning",
    ]
    results, warm = {}, {}
    results["lmadapt"], warm["lmadapt"] = bench_server("lmadapt", ours, port, args, texts)
    port = free_port()
    baseline = [
        sys.executable,
        "-m",
        "bench.load_test",
        "--baseline-server",
        "--run",
        args.run,
        "--port",
        str(port),
    ]
    results["baseline"], warm["baseline"] = bench_server("baseline", baseline, port, args, texts)

    report = {
        "run": str(args.run),
        "clients": args.clients,
        "seconds": args.seconds,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "machine": host(),
        "labels_agree": warm["lmadapt"] == warm["baseline"],
        "speedup": round(
            results["lmadapt"]["requests_per_second"]
            / max(results["baseline"]["requests_per_second"], 1e-9),
            2,
        ),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    print(
        f"\nspeedup {report['speedup']}x, labels agree: {report['labels_agree']}; "
        f"written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
