"""The memory estimate against the measured peak: one `lmadapt train` per row, each in its own
process, over tasks, methods, gradient checkpointing and quantisation on the embedded models and
the staged data.

python -m bench.memory_estimate [--only ROW,...] [--steps 4] [--out DIR]

A row trains --steps steps of a shipped config (or a minimal one) with a small dev/test slice,
so the batch that the estimate sizes (the longest train rows, at the configured batch) is
reached: length grouping puts the longest rows in one batch. estimated: the peak RSS lmadapt
printed before it loaded the model. peak: the row process's ru_maxrss (loading, training and
evaluation). peak anon: the largest RssAnon sampled every 20 ms (what the process allocated,
without the mapped files and libraries). The parent rewrites DIR/memory_estimate.json and .md
after each row, keeping rows it did not run. --before FILE: the previous estimator's printed
peaks (JSON, row -> GiB), shown beside.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.run_one import SHARED

D = SHARED
ESTIMATE = re.compile(
    r"lmadapt: memory: this run needs about ([\d.]+) GiB.*peak RSS about ([\d.]+) GiB"
)

# name -> (config, overrides). Small train slices: max_steps cuts the run; the longest rows of
# the slice are what the estimate sizes (it reads the longest train feature).
ROWS: dict[str, tuple[str, list[str]]] = {
    "classification/minilm/full": ("configs/sst2_full.yaml", []),
    "classification/minilm/lora": ("configs/sst2_lora.yaml", []),
    "classification/minilm/bitfit": ("configs/sst2_bitfit.yaml", []),
    "classification/minilm/adalora": ("configs/sst2_lora.yaml", ["method={name: adalora}"]),
    "classification/minilm/ia3": ("configs/sst2_lora.yaml", ["method={name: ia3}"]),
    "classification/minilm/adapter": ("configs/sst2_lora.yaml", ["method={name: adapter}"]),
    "classification/minilm/prompt_tuning": (
        "configs/sst2_lora.yaml",
        ["method={name: prompt_tuning}"],
    ),
    "classification/minilm/lora-int8": ("configs/sst2_lora.yaml", ["quantize=int8"]),
    "ner/minilm/lora": ("configs/conll_lora.yaml", []),
    "ner/minilm/full": ("configs/conll_full.yaml", []),
    "qa/minilm/lora": ("configs/squad_minilm_lora.yaml", []),
    "qa/minilm/full": ("configs/squad_minilm.yaml", []),
    "qa/minilm/lora-ckpt": (
        "configs/squad_minilm_lora.yaml",
        ["train.gradient_checkpointing=true"],
    ),
    "generation/smollm2/lora": ("configs/gsm8k_lora.yaml", []),
    "generation/smollm2/lora-ckpt": (
        "configs/gsm8k_lora.yaml",
        ["train.gradient_checkpointing=true"],
    ),
    "generation/smollm2/qlora-nf4": ("configs/gsm8k_lora.yaml", ["quantize=nf4"]),
    # `method=full`: a method given by name replaces the config's whole method section
    "generation/smollm2/full": ("configs/gsm8k_lora.yaml", ["method=full"]),
    "preference/smollm2/lora": ("configs/preference_dpo.yaml", ["train.batch_size=4"]),
    "preference/smollm2/full": (  # a frozen copy of the base is the reference model
        "configs/preference_dpo.yaml",
        ["method=full", "train.batch_size=4"],
    ),
    "classification/smollm2/lora": (
        "configs/sst2_lora.yaml",
        ["model=smollm2-135m-instruct", "method.target_modules=[q_proj,v_proj]"],
    ),
}


def _row_overrides(name: str, steps: int, out: str) -> list[str]:
    """The run cut short; the longest rows batched together, so the batch the estimate sizes
    is trained; generation's sample replies short (evaluation is not what is measured)."""
    lm = name.startswith(("generation", "preference"))
    return [
        f"train.max_steps={steps}",
        "train.group_by_length=true",
        *(["task.max_new_tokens=4"] if lm else []),
        f"data.max_train_samples={256 if 'generation' not in name else 128}",
        "data.max_eval_samples=32",
        "train.early_stopping=null",
        f"output_dir={out}",
    ]


class AnonPeak:
    """The largest RssAnon of this process, sampled every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        return self.peak


def child(result: str, argv: list[str]) -> None:
    """Run `lmadapt argv` in this process and write its peak memory to `result`."""
    from lmadapt.cli import main as cli

    anon = AnonPeak()
    code = 0
    try:
        code = cli(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    Path(result).write_text(
        json.dumps(
            {
                "exit": code,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mb": anon.stop(),
            }
        )
    )


def run_row(name: str, steps: int) -> dict:
    config, extra = ROWS[name]
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["train", config, *extra, *_row_overrides(name, steps, f"{tmp}/run")]
        res = f"{tmp}/result.json"
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-m", "bench.memory_estimate", "--child", res, "--", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        m = ESTIMATE.search(p.stderr)
        out = json.loads(Path(res).read_text()) if Path(res).exists() else {"exit": p.returncode}
    row = {
        "row": name,
        "command": "lmadapt " + " ".join(argv[:-1]),
        "wall_s": round(time.time() - t0, 1),
    }
    row.update(out)
    if m:
        row["estimate_total_gib"] = float(m.group(1))
        row["estimate_peak_gib"] = float(m.group(2))
        row["est_over_peak"] = (
            round(float(m.group(2)) * 1024 / out["peak_mb"], 3) if "peak_mb" in out else None
        )
    if out.get("exit", p.returncode) != 0:
        row["stderr_tail"] = p.stderr[-2000:]
    return row


def table(rows: list[dict]) -> str:
    """Markdown: the estimate against the measured peak, and the estimate of `before` (the
    previous estimator's printed peak for the same row, where recorded)."""
    out = [
        "| row | estimated peak GiB | measured peak GiB | estimate / peak | previous estimate "
        "GiB | previous / peak | peak anon GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r.get("peak_mb", 0) / 1024
        old = r.get("before_peak_gib")
        ratio = f"{old / peak:.2f}" if old and peak else ""
        out.append(
            f"| {r['row']} | {r.get('estimate_peak_gib', '')} | {peak:.2f} | "
            f"{r.get('est_over_peak', '')} | {old or ''} | "
            f"{ratio} | {r.get('peak_anon_mb', 0) / 1024:.2f} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", default=None)
    ap.add_argument(
        "--before",
        default=None,
        help="JSON {row: printed peak GiB} of the previous estimator, shown beside",
    )
    ap.add_argument("argv", nargs="*")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.argv)
        return
    out = Path(args.out)
    path = out / "memory_estimate.json"
    done = {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    names = [n for n in ROWS if not args.only or any(n.startswith(o) for o in args.only.split(","))]
    before = json.loads(Path(args.before).read_text()) if args.before else {}
    for name in names:
        row = run_row(name, args.steps)
        if name in before:
            row["before_peak_gib"] = before[name]
        print(json.dumps(row), flush=True)
        done[name] = row
        ordered = [done[n] for n in ROWS if n in done]
        path.write_text(
            json.dumps({"command": "python -m bench.memory_estimate", "rows": ordered}, indent=1)
        )
        (out / "memory_estimate.md").write_text(table(ordered))


if __name__ == "__main__":
    main()
