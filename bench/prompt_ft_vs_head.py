"""Prompt-based fine-tuning (task prompt_classification: CE over verbalizer scores through the LM
head) vs a head-based classifier (task classification: new linear head) on the same model and
method, with k examples per class sampled from SST-2 train, 3 seeds, dev = SST-2 dev.

    python -m bench.prompt_ft_vs_head --per-class 16 64 --seeds 0 1 2 --method lora
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.io import write_json, write_text

DATA = Path("../shared/data/sst2")
TASKS = {
    "prompt": {"type": "prompt_classification", "template": "sentiment"},
    "head": {"type": "classification"},
}


def sample_per_class(rows: list[dict], k: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for label in sorted({r["label"] for r in rows}):
        out += rng.sample([r for r in rows if r["label"] == label], k)
    rng.shuffle(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--dev-samples", type=int, default=None, help="cap dev rows (speed)")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args(argv)
    with open(DATA / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # rows already measured (other per-class values) are kept, so one k can be (re)run alone
    out_json = Path(a.out) / "prompt_ft_vs_head.json"
    results: dict[str, dict] = json.loads(out_json.read_text()) if out_json.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.per_class:
            for name, task in TASKS.items():
                accs = []
                for seed in a.seeds:
                    path = Path(tmp) / f"train_{k}_{seed}.tsv"
                    with open(path, "w", encoding="utf-8", newline="") as f:
                        w = csv.DictWriter(f, ["sentence", "label"], delimiter="\t")
                        w.writeheader()
                        w.writerows(sample_per_class(rows, k, seed))
                    cfg = build_run_config(
                        {
                            "model": a.model,
                            "task": task,
                            "method": {"name": a.method},
                            "data": {
                                "train": str(path),
                                "dev": str(DATA / "dev.tsv"),
                                "max_eval_samples": a.dev_samples,
                            },
                            "train": {
                                "epochs": a.epochs,
                                "batch_size": 8,
                                "seed": seed,
                                "eval_batch_size": 32,
                                # dev is scored once, after the last epoch: choosing epochs on
                                # a dev set would not be few-shot any more
                                "eval_every": 10**9,
                            },
                            "output_dir": str(Path(tmp) / f"run_{name}_{k}_{seed}"),
                        }
                    )
                    accs.append(train(cfg)["dev"]["accuracy"])
                    print(f"{name} k={k} seed={seed}: dev accuracy {accs[-1]:.4f}", flush=True)
                sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
                results[f"{name}_{k}"] = {"mean": float(np.mean(accs)), "sd": sd, "runs": accs}
                write_json(out_json, results)
    table = ["| per class | prompt-based FT | head classifier |", "|---|---|---|"]
    for k in sorted({int(key.split("_")[1]) for key in results}):
        p, h = results[f"prompt_{k}"], results[f"head_{k}"]
        table.append(f"| {k} | {p['mean']:.4f} ± {p['sd']:.4f} | {h['mean']:.4f} ± {h['sd']:.4f} |")
    md = (
        f"# Prompt-based FT vs head ({a.model}, {a.method}, SST-2 dev accuracy, "
        f"mean ± sd over seeds {a.seeds})\n\n" + "\n".join(table) + "\n"
    )
    write_text(Path(a.out) / "prompt_ft_vs_head.md", md)
    print(md)
    return results


if __name__ == "__main__":
    main()
