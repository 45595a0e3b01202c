"""Serving speed: one classification run served four ways, at 1, 8 and 32 clients.

    python -m bench.serve_speed --run RUN_DIR [--dev FILE] [--seconds 20]

Rows, each its own server process, started one after another on 127.0.0.1 and driven by the
same client (N threads, each posting one dev-set text at a time to /v1/classify):
- peer: a transformers `pipeline("text-classification")` over the run's merged model behind a
  minimal FastAPI app (bench.load_test's baseline: one request at a time);
- lmadapt eager: `lmadapt serve RUN` (PyTorch, micro-batching);
- lmadapt ONNX fp32 / int8: `lmadapt serve` of `lmadapt export RUN --format onnx [--quantize
  int8]` (written first, into a temporary directory, by the CLI).
Each row's accuracy is measured on the dev set through its own HTTP endpoint, before the load.
Rows run interleaved, `--repeats` rounds (a slow spell of the machine then hits every row);
the median round's requests/s and p50/p99 latency and the server's peak RSS go to
bench/results/serve_speed.json and a markdown table to serve_speed.md. The client threads share
the machine's cores with the server, as a load generator on the same host does; every row pays
the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load_test import REQUEST_TIMEOUT, drive, free_port, host, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CLIENTS = (1, 8, 32)
CHUNK = 32
"""Texts per request when measuring accuracy."""


def dev_set(run: str, dev: str | None) -> tuple[str, list[str], list[str]]:
    """The dev file (the run's data.dev unless given), its texts and gold labels, read by the
    run's own task so that columns and label names are the run's."""
    from lmadapt.api import read_run

    info = read_run(run)
    path = dev or info.config.data.dev
    if not path:
        raise SystemExit(f"{run} has no dev set: pass --dev FILE")
    examples = info.task.read(str(path), info.config.data.format)
    return str(path), [e.text for e in examples], [str(e.label) for e in examples]


def export(run: str, out: Path, quantize: bool) -> dict[str, Any]:
    """`lmadapt export RUN --format onnx` in a subprocess; returns its lmadapt_export.json."""
    cmd = [sys.executable, "-m", "lmadapt", "export", run, "--format", "onnx", "--out", str(out)]
    if quantize:
        cmd += ["--quantize", "int8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return json.loads((out / "lmadapt_export.json").read_text())


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), read before it stops."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def predictions(base: str, model: str, texts: list[str]) -> list[str]:
    labels: list[str] = []
    with httpx.Client(timeout=REQUEST_TIMEOUT * 4) as http:
        for i in range(0, len(texts), CHUNK):
            r = http.post(
                f"{base}/v1/classify", json={"model": model, "texts": texts[i : i + CHUNK]}
            )
            r.raise_for_status()
            labels += [row["label"] for row in r.json()["results"]]
    return labels


def measure(
    name: str,
    cmd: list[str],
    port: int,
    model: str,
    texts: list[str],
    gold: list[str] | None,
    seconds: float,
) -> dict[str, Any]:
    """Start the server, score it on the dev set (when `gold` is given), drive it at each
    client count, stop it."""
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(cmd, port, Path(tmp) / "server.log")
        try:
            if gold is not None:
                out["predicted"] = predictions(base, model, texts)
                out["accuracy"] = sum(p == g for p, g in zip(out["predicted"], gold)) / len(gold)
                print(f"{name}: dev accuracy {out['accuracy']:.4f}", file=sys.stderr)
            out["clients"] = {}
            for n in CLIENTS:
                print(f"{name}: {n} clients for {seconds:.0f}s ...", file=sys.stderr)
                out["clients"][str(n)] = drive(f"{base}/v1/classify", model, n, seconds, texts)
            out["peak_rss_mb"] = peak_rss_mb(proc.pid)
        finally:
            stop_server(proc)
    return out


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median requests/s (its latencies with it), and every repeat's
    requests/s."""
    ranked = sorted(runs, key=lambda r: r["requests_per_second"])
    return {
        **ranked[len(ranked) // 2],
        "repeats_requests_per_second": [r["requests_per_second"] for r in runs],
    }


def serve_cmd(path: str, port: int, max_batch: int, max_wait_ms: float) -> list[str]:
    return [
        sys.executable, "-m", "lmadapt", "serve", path, "--host", "127.0.0.1", "--port", str(port),
        "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning",
        "--device", "cpu",
    ]  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    peer = rows["peer"]["clients"]
    head = " | ".join(f"{n} client{'s' * (n > 1)}: req/s (x peer), p50/p99 ms" for n in CLIENTS)
    lines = [
        f"| server | dev accuracy | {head} | peak RSS MB |",
        "|---|---:|" + "---:|" * len(CLIENTS) + "---:|",
    ]
    for name, r in rows.items():
        cells = []
        for n in CLIENTS:
            c = r["clients"][str(n)]
            ratio = c["requests_per_second"] / max(peer[str(n)]["requests_per_second"], 1e-9)
            cells.append(
                f"{c['requests_per_second']:.1f} ({ratio:.2f}x), {c['p50_ms']}/{c['p99_ms']}"
            )
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | " + " | ".join(cells) + f" | {r['peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve_speed", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--run", required=True, help="finished classification run (LoRA, merged for the peer)"
    )
    p.add_argument("--dev", help="labelled file to score each row on; default: the run's data.dev")
    p.add_argument("--seconds", type=float, default=20.0, help="load per client count")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds over the rows; the median is reported"
    )
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=RESULTS / "serve_speed.json")
    args = p.parse_args(argv)

    dev, texts, gold = dev_set(args.run, args.dev)
    model = Path(args.run).resolve().name
    rows: dict[str, dict[str, Any]] = {}
    exports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the exports share the run's directory name, so every row answers to the same model name
        fp32, int8 = Path(tmp) / "fp32" / model, Path(tmp) / "int8" / model
        exports["fp32"], exports["int8"] = (
            export(args.run, fp32, False),
            export(args.run, int8, True),
        )
        servers = {
            "peer": lambda port: (
                [sys.executable, "-m", "bench.load_test", "--baseline-server"]
                + ["--run", args.run, "--port", str(port)]
            ),
            "lmadapt eager": lambda port: serve_cmd(
                args.run, port, args.max_batch, args.max_wait_ms
            ),
            "lmadapt ONNX fp32": lambda port: serve_cmd(
                str(fp32), port, args.max_batch, args.max_wait_ms
            ),
            "lmadapt ONNX int8": lambda port: serve_cmd(
                str(int8), port, args.max_batch, args.max_wait_ms
            ),
        }
        # rows interleaved, `--repeats` rounds: a slow spell of the machine hits every row
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for r in range(args.repeats):
            for name, cmd in servers.items():
                port = free_port()
                got = measure(
                    name, cmd(port), port, model, texts, gold if r == 0 else None, args.seconds
                )
                runs[name].append(got)
        for name, got in runs.items():
            first = got[0]
            rows[name] = {
                "accuracy": first["accuracy"],
                "predicted": first["predicted"],
                "peak_rss_mb": max(g["peak_rss_mb"] or 0 for g in got),
                "clients": {
                    str(n): median_run([g["clients"][str(n)] for g in got]) for n in CLIENTS
                },
            }

    eager = rows["lmadapt eager"]["predicted"]
    for r in rows.values():
        r["agreement_with_eager"] = sum(a == b for a, b in zip(r.pop("predicted"), eager)) / len(
            eager
        )
    int8_q = exports["int8"]["int8"]
    report = {
        "command": "python -m bench.serve_speed "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "run": str(args.run),
        "dev": dev,
        "dev_examples": len(gold),
        "seconds_per_load": args.seconds,
        "repeats": args.repeats,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "machine": host(),
        "int8_export": {
            "fp32_mb": round(int8_q["fp32_bytes"] / 2**20, 1),
            "int8_mb": round(int8_q["int8_bytes"] / 2**20, 1),
            "dev": int8_q["dev"],
        },
        "fp32_export_max_abs_diff": exports["fp32"]["max_abs_diff"],
        "int8_vs_peer_at_32": round(
            rows["lmadapt ONNX int8"]["clients"]["32"]["requests_per_second"]
            / max(rows["peer"]["clients"]["32"]["requests_per_second"], 1e-9),
            2,
        ),
        "int8_accuracy_cost_points": round(
            100 * (rows["peer"]["accuracy"] - rows["lmadapt ONNX int8"]["accuracy"]), 2
        ),
        "rows": rows,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    args.out.with_suffix(".md").write_text(
        f"# Serving speed\n\n`{report['command']}`, {len(gold)} dev examples ({dev}), "
        f"{args.seconds:.0f} s per client count, {os.cpu_count()} CPUs; requests/s is the "
        f"median of {args.repeats} interleaved rounds (p50/p99 of that round).\n\n{table}\n\n"
        f"ONNX int8 vs peer at 32 clients: {report['int8_vs_peer_at_32']}x requests/s, "
        f"{report['int8_accuracy_cost_points']} points accuracy cost.\n",
        encoding="utf-8",
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
