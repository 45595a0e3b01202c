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
from lmadapt.io import write_json, write_text

RESULTS = Path(__file__).parent / "results"
# matmul parameters each token passes through
NON_EMBEDDING_PARAMS = {
    "sst2": 10_646_784,  # MiniLM-L6 encoder layers (embeddings, pooler excluded)
    "instruct": 134_553_600,  # SmolLM2-135M: 30 layers 106,168,320 + LM head 576 x 49,152
}
INT8_BASE = {"base_dtype": "int8", "precision": "fp32"}
"""The frozen linears multiply in int8 (fbgemm), the rest in fp32."""
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
            out.append(row(f"{m}/lmadapt int8 base", "lmadapt", m, INT8_BASE))
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


def cpu_kind(machine: dict) -> str:
    return "with bf16 units" if machine.get("bf16_units") else "without bf16 units"


def add_mfu(r: dict, machine: dict) -> None:
    """Model-FLOPs utilisation against the peak of the arithmetic the row's matmuls ran in (bf16
    under autocast, int8 for an int8 frozen base, else fp32), and against the fp32 peak."""
    if "error" in r:
        return
    params = NON_EMBEDDING_PARAMS[r["task"]]
    flops = BACKWARD_FACTOR[r["method"]] * params * r["tokens"] / r["train_seconds"]
    int8 = r.get("train_opts", {}).get("base_dtype") == "int8"
    peak = machine["bf16_gflops" if r["bf16"] else "int8_gflops" if int8 else "fp32_gflops"]
    r["model_tflops"] = round(flops / 1e12, 4)
    r["mfu"] = round(flops / (peak * 1e9), 4)
    r["mfu_fp32"] = round(flops / (machine["fp32_gflops"] * 1e9), 4)


def _same_run(r: dict) -> tuple[str, str, str, str]:
    """Rows compared with a peer: same kind of CPU, task and method, measured the same day (one
    run of the bench: a partial re-run keeps older rows, which a later day's peer must not
    divide)."""
    return cpu_kind(r["machine"]), r["task"], r["method"], r.get("measured_at", "")[:10]


def _machine(m: dict) -> str:
    cpu = f"{m['cpu']}, {m['isa']}, " if "cpu" in m else ""
    flops = ", ".join(
        f"{k.split('_')[0]} {m[k]:.0f}"
        for k in ("fp32_gflops", "bf16_gflops", "int8_gflops")
        if k in m
    )
    return f"{cpu}{m.get('threads', '?')} threads, GFLOP/s: {flops or 'not recorded'}"


def table(results: list[dict]) -> str:
    """One table per kind of CPU (with or without bf16 units), each row's ratio to the best peer
    row of its own run."""
    best: dict[tuple[str, str, str, str], float] = {}
    for r in results:
        if r.get("impl") == "hf" and "error" not in r:
            key = _same_run(r)
            best[key] = max(best.get(key, 0), r["samples_per_second"])
    head = (
        "| run | rows | samples/s | tokens/s | x peer best | dev metric | trainable | "
        "peak RSS MB | MFU | MFU vs fp32 peak | measured |"
    )
    out = []
    for kind in ("without bf16 units", "with bf16 units"):
        rows = [r for r in results if cpu_kind(r["machine"]) == kind]
        if not rows:
            continue
        machines = sorted({_machine(r["machine"]) for r in rows})
        out += [f"### A CPU {kind}", "", *(f"- machine: {m}" for m in machines), ""]
        out += [head, "|" + "---|" * 11]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['name']} | error: {r['error']} |" + " |" * 9)
                continue
            peer = best.get(_same_run(r))
            ratio = f"{r['samples_per_second'] / peer:.2f}" if peer else "-"  # no peer that day
            dev = (
                f"acc {r['dev_accuracy']:.4f}"
                if "dev_accuracy" in r
                else f"loss {r['dev_loss']:.4f}"
            )
            fp32 = f"{100 * r['mfu_fp32']:.1f}%" if "mfu_fp32" in r else "-"
            out.append(
                f"| {r['name']} | {r['rows']} | {r['samples_per_second']:.1f} | "
                f"{r['tokens_per_second']:.0f} | {ratio} | {dev} | "
                f"{r['trainable_params']:,} | {r['peak_rss_mb']:.0f} | {100 * r['mfu']:.1f}% | "
                f"{fp32} | {r.get('measured_at', '')} |"
            )
        out.append("")
    return "\n".join(out)


def _picked(name: str, key: str, names: set[str]) -> bool:
    """`key` names the run, or, where no run has that name, starts its name."""
    return name == key if key in names else name.startswith(key)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--rows", type=int, default=4000, help="SST-2 train rows for the slice runs")
    p.add_argument("--full", action="store_true", help="also LoRA on all 67,349 SST-2 rows")
    p.add_argument("--instruct-rows", type=int, default=128, help="GSM8K rows, SmolLM2 runs")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated run names (or starts of names, where no run has the name)",
    )
    args = p.parse_args()
    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    names = {s["name"] for s in scenarios(args.rows, 67349, args.instruct_rows)}
    chosen = [
        s
        for s in scenarios(args.rows, 67349 if args.full else None, args.instruct_rows)
        if not args.only or any(_picked(s["name"], k, names) for k in args.only.split(","))
    ]
    fresh = {}
    for s in chosen:
        r = run(s)
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        fresh[r["name"]] = r
        print(json.dumps(r), flush=True)
    # this host's speed can move by half within a run: the peaks are measured before and after,
    # and utilisation is taken against the higher reading of each
    after = machine_info()
    print(f"machine after: {after}", flush=True)
    for key in ("fp32_gflops", "bf16_gflops", "int8_gflops"):
        machine[f"{key}_readings"] = [machine[key], after[key]]
        machine[key] = max(machine[key], after[key])
    for r in fresh.values():
        r["machine"] = machine
        add_mfu(r, machine)
    # this kind of CPU's rows are replaced by this run's (all of them, or those of --only); the
    # other kind's rows are kept: each kind has its own table
    path = RESULTS / "train_speed.json"
    kept = json.loads(path.read_text())["results"] if path.exists() else []
    kind = cpu_kind(machine)
    same_kind = [r for r in kept if cpu_kind(r["machine"]) == kind] if args.only else []
    old = {r["name"]: r for r in same_kind if r["name"] not in fresh}
    order = [s["name"] for s in scenarios(args.rows, 67349, args.instruct_rows)]
    results = [r for name in order for r in [fresh.get(name) or old.get(name)] if r]
    results += [r for r in kept if cpu_kind(r["machine"]) != kind]
    RESULTS.mkdir(exist_ok=True)
    write_json(path, {"results": results})
    md = table(results)
    write_text(RESULTS / "train_speed.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
