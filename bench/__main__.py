"""`python -m bench`: lmadapt vs HF Trainer + peft, one run after another, each in its own process.

Writes bench/results/train_speed.json and .md: samples/s, useful tokens/s (padding excluded),
dev accuracy, peak RSS, model-FLOPs utilisation, and the ratio to the peer's best configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine_info

RESULTS = Path(__file__).parent / "results"
# matmul parameters each token passes through
NON_EMBEDDING_PARAMS = {
    "sst2": 10_646_784,  # MiniLM-L6 encoder layers (embeddings, pooler excluded)
    "instruct": 134_553_600,  # SmolLM2-135M: 30 layers 106,168,320 + LM head 576 x 49,152
}
BACKWARD_FACTOR = {"full": 6, "bitfit": 4, "lora": 4}
"""FLOPs per parameter per token: forward 2 + input-grad 2 (+ weight-grad 2 when weights train)."""


def scenarios(rows: int, full_rows: int | None, instruct_rows: int) -> list[dict]:
    """Peer runs (HF Trainer, random and length-grouped batches), lmadapt's defaults, and
    lmadapt with the other dropout (LoRA and BitFit: the model's, full: none); then
    one-feature-off ablations of LoRA; then instruction tuning of SmolLM2 with LoRA (peer:
    padding collator, fp32 and bf16)."""

    def row(
        name: str,
        impl: str,
        method: str,
        opts: dict | None = None,
        n: int = rows,
        task: str = "sst2",
        batch: int | None = None,
        method_opts: dict | None = None,
    ) -> dict:
        return {
            "name": name,
            "impl": impl,
            "method": method,
            "rows": n,
            "opts": opts or {},
            "task": task,
            "batch": batch,
            "method_opts": method_opts or {},
        }

    out = []
    for m in ("lora", "bitfit", "full"):
        out += [
            row(f"{m}/hf", "hf", m),
            row(f"{m}/hf+group_by_length", "hf", m, {"group_by_length": True}),
            row(f"{m}/lmadapt", "lmadapt", m),
        ]
        if m == "full":
            out.append(row(f"{m}/lmadapt dropout=0", "lmadapt", m, {"dropout": 0.0}))
        else:  # the defaults train a frozen base without dropout; the old default beside them
            lora = {"dropout": 0.1} if m == "lora" else {}
            old = {"dropout": "model"}
            out.append(row(f"{m}/lmadapt model's dropout", "lmadapt", m, old, method_opts=lora))
    out += [
        row(
            "lora/lmadapt dropout=0 fp32", "lmadapt", "lora", {"dropout": 0.0, "precision": "fp32"}
        ),
        row(
            "lora/lmadapt dropout=0 no grouping",
            "lmadapt",
            "lora",
            {"dropout": 0.0, "group_by_length": False},
        ),
        row(
            "lora/lmadapt dropout=0 sdpa", "lmadapt", "lora", {"dropout": 0.0, "attention": "sdpa"}
        ),
        row(
            "full/lmadapt dropout=0 foreach AdamW",
            "lmadapt",
            "full",
            {"dropout": 0.0, "optimizer": "foreach"},
        ),
    ]
    if full_rows is not None:
        # all of SST-2 in one epoch: batch 128 amortises the per-step overhead (lr 2e-3 beat
        # 1e-3 there, 0.869 vs 0.864; batch 64 gave 0.861 in 174 s)
        full = {"dropout": 0.0, "lr": 2e-3}
        out.append(
            row("lora/lmadapt full SST-2 batch 128", "lmadapt", "lora", full, full_rows, batch=128)
        )
    n, t = instruct_rows, "instruct"
    out += [
        row("instruct-lora/hf", "hf", "lora", {}, n, t),
        row(
            "instruct-lora/hf bf16+group_by_length",
            "hf",
            "lora",
            {"bf16": True, "group_by_length": True},
            n,
            t,
        ),
        row("instruct-lora/lmadapt", "lmadapt", "lora", {}, n, t),
        row("instruct-lora/lmadapt dropout=0", "lmadapt", "lora", {"dropout": 0.0}, n, t),
        row(
            "instruct-lora/lmadapt dropout=0 logits everywhere",
            "lmadapt",
            "lora",
            {"dropout": 0.0, "loss_positions_only": False},
            n,
            t,
        ),
        row(
            "instruct-lora/lmadapt dropout=0 packing",
            "lmadapt",
            "lora",
            {"dropout": 0.0, "packing": True, "group_by_length": False},
            n,
            t,
        ),
    ]
    return out


def command(s: dict) -> list[str]:
    """The bench.run_one command line of scenario `s`."""
    cmd = [
        sys.executable,
        "-m",
        "bench.run_one",
        "--impl",
        s["impl"],
        "--method",
        s["method"],
        "--task",
        s["task"],
        "--rows",
        str(s["rows"]),
        "--train-opts",
        json.dumps(s["opts"]),
        "--method-opts",
        json.dumps(s.get("method_opts", {})),
    ]
    if s["batch"]:
        cmd += ["--batch-size", str(s["batch"])]
    return cmd


def run(s: dict) -> dict:
    cmd = command(s)
    print(f"== {s['name']}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"name": s["name"], "error": f"exit {proc.returncode}"}
    return {"name": s["name"], **json.loads(line[len("RESULT ") :])}


def add_mfu(r: dict, machine: dict) -> None:
    if "error" in r:
        return
    params = NON_EMBEDDING_PARAMS[r["task"]]
    flops = BACKWARD_FACTOR[r["method"]] * params * r["tokens"] / r["train_seconds"]
    peak = machine["bf16_gflops" if r["bf16"] else "fp32_gflops"] * 1e9
    r["model_tflops"] = round(flops / 1e12, 4)
    r["mfu"] = round(flops / peak, 4)


def _same_run(r: dict) -> tuple[str, str, str]:
    """Rows compared with a peer: same task and method, measured the same day (one run of the
    bench: a partial re-run keeps older rows, which a later day's peer must not divide)."""
    return r["task"], r["method"], r.get("measured_at", "")[:10]


def table(results: list[dict]) -> str:
    best: dict[tuple[str, str, str], float] = {}
    for r in results:
        if r.get("impl") == "hf" and "error" not in r:
            key = _same_run(r)
            best[key] = max(best.get(key, 0), r["samples_per_second"])
    head = (
        "| run | rows | samples/s | tokens/s | x peer best | dev metric | trainable | "
        "peak RSS MB | MFU | measured |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |" + " |" * 8)
            continue
        peer = best.get(_same_run(r))
        ratio = f"{r['samples_per_second'] / peer:.2f}" if peer else "-"  # no peer that day
        dev = f"acc {r['dev_accuracy']:.4f}" if "dev_accuracy" in r else f"loss {r['dev_loss']:.4f}"
        lines.append(
            f"| {r['name']} | {r['rows']} | {r['samples_per_second']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {ratio} | {dev} | "
            f"{r['trainable_params']:,} | {r['peak_rss_mb']:.0f} | {100 * r['mfu']:.1f}% | "
            f"{r.get('measured_at', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--rows", type=int, default=4000, help="SST-2 train rows for the slice runs")
    p.add_argument("--full", action="store_true", help="also LoRA on all 67,349 SST-2 rows")
    p.add_argument("--instruct-rows", type=int, default=128, help="GSM8K rows, SmolLM2 runs")
    p.add_argument("--only", default="", help="comma-separated starts of run names")
    args = p.parse_args()
    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    chosen = [
        s
        for s in scenarios(args.rows, 67349 if args.full else None, args.instruct_rows)
        if not args.only or any(s["name"].startswith(k) for k in args.only.split(","))
    ]
    fresh = {}
    for s in chosen:
        r = run(s)
        add_mfu(r, machine)
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        fresh[r["name"]] = r
        print(json.dumps(r), flush=True)
    # a partial run (--only) replaces its rows and keeps the others' earlier figures
    path = RESULTS / "train_speed.json"
    kept = json.loads(path.read_text())["results"] if args.only and path.exists() else []
    old = {r["name"]: r for r in kept if r["name"] not in fresh}
    order = [s["name"] for s in scenarios(args.rows, 67349, args.instruct_rows)]
    results = [r for name in order for r in [fresh.get(name) or old.get(name)] if r]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(
        json.dumps({"machine": machine, "results": results}, indent=2) + "\n"
    )
    md = table(results)
    (RESULTS / "train_speed.md").write_text(f"machine: {machine}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
