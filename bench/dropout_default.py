"""Evidence for `train.dropout`'s default: the model's own dropout vs none, on data the defaults
were not tuned on (SUBJ), from a user's minimal config (model, task, method, files).

    .venv/bin/python -m bench.dropout_default [--seeds 0 1] [--few-shot-seeds 0 1 2]

Scenarios: classification with MiniLM (LoRA and full, 2,000 training rows sampled from SUBJ
train, dev = 1,000 SUBJ test rows, test = the other 1,000), and few-shot prompt-based
fine-tuning of SmolLM2 (LoRA, 16 per class, dev scored once after the last epoch). Each pair
differs only in `train.dropout` (unset vs 0). NER and instruction tuning are measured in
bench/ner_side_by_side.py and bench/__main__.py. Writes bench/results/dropout_default.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import mean

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.io import write_json, write_text

SUBJ = Path(__file__).resolve().parents[2] / "shared" / "data" / "subj"
RESULTS = Path(__file__).parent / "results"
FEW_SHOT_TASK = {
    "type": "prompt_classification",
    "template": {
        "instruction": "Is the sentence subjective (an opinion) or objective (a fact)?",
        "input": "Sentence: {text}",
        "output": "Answer: {label}",
    },
    "verbalizer": {"0": "subjective", "1": "objective"},
}


def read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write(rows: list[dict], path: Path) -> str:
    # as the source file is: tab-separated, quotes literal (no text holds a tab)
    path.write_text(
        "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def scenarios(tmp: Path, seed: int) -> dict[str, dict]:
    """name -> the user's minimal config for one seed (training rows depend on the seed)."""
    rng = random.Random(seed)
    train_rows, test_rows = read(SUBJ / "train.tsv"), read(SUBJ / "test.tsv")
    dev = write(test_rows[:1000], tmp / "dev.tsv")
    test = write(test_rows[1000:], tmp / "test.tsv")
    sample = write(rng.sample(train_rows, 2000), tmp / f"train2000_{seed}.tsv")
    few = [
        r for label in "01" for r in rng.sample([x for x in train_rows if x["label"] == label], 16)
    ]
    few = write(few, tmp / f"train16_{seed}.tsv")
    head = {"model": "minilm", "task": {"type": "classification"}}
    data = {"train": sample, "dev": dev, "test": test}
    return {
        "classification, MiniLM lora, 2000 rows": {
            **head,
            "method": {"name": "lora"},
            "data": data,
        },
        "classification, MiniLM full, 2000 rows": {
            **head,
            "method": {"name": "full"},
            "data": data,
        },
        "few-shot prompt FT, SmolLM2 lora, 16/class": {
            "model": "smollm2-135m-instruct",
            "task": FEW_SHOT_TASK,
            "method": {"name": "lora"},
            "data": {"train": few, "dev": dev, "max_eval_samples": 500},
            # dev scored once, after the last epoch: choosing epochs on dev is not few-shot
            "train": {"epochs": 10, "batch_size": 8, "eval_every": 10**9},
        },
    }


def measure(name: str, cfg: dict, seed: int, dropout: float | None, out: Path) -> dict:
    """One run of scenario `name` (its config from `scenarios`): train.dropout unset if None."""
    t = {**cfg.get("train", {}), "seed": seed}
    if dropout is not None:
        t["dropout"] = dropout
    run = build_run_config({**cfg, "train": t, "output_dir": str(out)})
    start = time.perf_counter()
    m = train(run)
    split = "dev" if name.startswith("few-shot") else "test"
    return {
        "seed": seed,
        f"{split}_accuracy": m[split]["accuracy"],
        "train_seconds": m["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--few-shot-seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in sorted(set(a.seeds) | set(a.few_shot_seeds)):
            for i, (name, cfg) in enumerate(scenarios(Path(tmp), seed).items()):
                few_shot = name.startswith("few-shot")
                if seed not in (a.few_shot_seeds if few_shot else a.seeds):
                    continue
                for dropout in (None, 0.0):
                    out = Path(tmp) / f"run_{i}_{seed}_{dropout}"  # one per scenario, seed, dropout
                    row = results.setdefault(name, {}).setdefault(str(dropout), [])
                    row.append(measure(name, cfg, seed, dropout, out))
                    print(name, seed, dropout, row[-1], flush=True)
                    write_json(RESULTS / "dropout_default.json", results)
    write_text(RESULTS / "dropout_default.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = [
        "| scenario | metric | model's dropout | dropout 0 | train s (model's / 0) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, by in results.items():
        keep, zero = by["None"], by["0.0"]
        metric = next(k for k in keep[0] if k.endswith("accuracy"))
        acc = [mean(r[metric] for r in rs) for rs in (keep, zero)]
        secs = [mean(r["train_seconds"] for r in rs) for rs in (keep, zero)]
        lines.append(
            f"| {name} | {metric} (mean) | {acc[0]:.4f} | {acc[1]:.4f} | "
            f"{secs[0]:.0f} / {secs[1]:.0f} | {len(keep)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
