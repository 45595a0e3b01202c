"""Does QLoRA keep quality? LoRA on SmolLM2-135M-Instruct with the frozen base in NF4
(`quantize: nf4`) against the same LoRA on a bf16 base (`train.base_dtype: bf16`), same steps,
same data, per seed.

    .venv/bin/python -m bench.qlora_quality [--seeds 0 1 2]

Instruction tuning on 256 GSM8K training problems sampled by the seed (one epoch, batch 8: 32
steps), from a user's minimal config (model, task, method, files); test = GSM8K test problems
100-299, scored by held-out response loss (greedy generation of 200 answers would take longer
than training). Goal (#31): the NF4 run's test loss within 2 % of the bf16 base's. Runs already
in bench/results/qlora_quality.json for a seed are replaced, others kept.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import mean

from bench.dropout_default import GSM8K, write_instruct
from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.io import write_json, write_text

RESULTS = Path(__file__).parent / "results"
ARMS: dict[str, dict] = {
    "bf16 base": {"train": {"base_dtype": "bf16"}},
    "nf4 base": {"quantize": "nf4"},
}


def config(tmp: Path, seed: int) -> dict:
    rng = random.Random(seed)
    rows = json.loads((GSM8K / "gsm8k_train.json").read_text(encoding="utf-8"))
    test = json.loads((GSM8K / "gsm8k_test.json").read_text(encoding="utf-8"))[100:300]
    return {
        "model": "smollm2-135m-instruct",
        "task": {"type": "generation", "eval_generate_max_samples": 0},
        "method": {"name": "lora"},
        "data": {
            "train": write_instruct(rng.sample(rows, 256), tmp / f"train_{seed}.json"),
            "test": write_instruct(test, tmp / "test.json"),
        },
        "train": {"epochs": 1, "batch_size": 8, "seed": seed},
    }


def measure(cfg: dict, arm: str, out: Path) -> dict:
    extra = ARMS[arm]
    run = {**cfg, "output_dir": str(out), "train": {**cfg["train"], **extra.get("train", {})}}
    run.update({k: v for k, v in extra.items() if k != "train"})
    start = time.perf_counter()
    m = train(build_run_config(run))
    return {
        "seed": cfg["train"]["seed"],
        "test_loss": m["test"]["loss"],
        "steps": m["steps"],
        "train_seconds": m["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "`python -m bench.qlora_quality --seeds 0 1 2`: SmolLM2-135M-Instruct LoRA (defaults), "
        "256 GSM8K training problems per seed, 32 steps of 8; test loss = held-out response "
        "loss on GSM8K test problems 100-299. Accuracy runs: other jobs may have shared the "
        "machine, so train seconds are indicative only.",
        "",
        "| arm | seeds | test loss per seed | mean test loss | vs bf16 base | train s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    ref = results.get("bf16 base", [])
    for arm, runs in results.items():
        losses = [r["test_loss"] for r in runs]
        by_seed = {r["seed"]: r["test_loss"] for r in ref}
        diffs = [
            (r["test_loss"] - by_seed[r["seed"]]) / by_seed[r["seed"]]
            for r in runs
            if r["seed"] in by_seed
        ]
        rel = ", ".join(f"{d:+.2%}" for d in diffs) if arm != "bf16 base" else ""
        lines.append(
            f"| {arm} | {len(runs)} | {', '.join(f'{x:.4f}' for x in losses)} | "
            f"{mean(losses):.4f} | {rel} | {mean(r['train_seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args(argv)
    path = RESULTS / "qlora_quality.json"
    results: dict[str, list] = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            cfg = config(Path(tmp), seed)
            for arm in ARMS:
                runs = results.setdefault(arm, [])
                runs[:] = [r for r in runs if r["seed"] != seed]
                runs.append(measure(cfg, arm, Path(tmp) / f"run_{seed}_{arm.split()[0]}"))
                runs.sort(key=lambda r: r["seed"])
                print(arm, runs[-1], flush=True)
                write_json(path, results)
                write_text(RESULTS / "qlora_quality.md", markdown(results))
    return results


if __name__ == "__main__":
    main()
