"""Evidence for a default, on data the defaults were not tuned on, from a user's minimal config
(model, task, method, files): the dropout (the model's own, lmadapt's old default, vs none) and
the frozen base's dtype on a CPU without bf16 units (fp32 vs int8 matmuls).

    .venv/bin/python -m bench.dropout_default [--choice dropout|base_dtype] [--seeds 0 1 2]
                                              [--scenarios lora ner]

Scenarios: classification with MiniLM (LoRA, BitFit and full, 2,000 training rows sampled from
SUBJ train, dev = 1,000 SUBJ test rows, test = the other 1,000); few-shot prompt-based
fine-tuning of SmolLM2 (LoRA, 16 per class, dev scored once after the last epoch); NER with
MiniLM LoRA (2,000 CoNLL-2003 training sentences, dev = 1,000 validation sentences, test = 1,000
test sentences); instruction tuning of SmolLM2 with LoRA (256 GSM8K training problems, one
epoch, no dev set (one epoch: nothing to choose); test = GSM8K test problems 100-299, scored by
response loss). The training
sample depends on the seed. Each pair differs only in the choice: for dropout,
`train.dropout: model` with LoRA's old default of 0.1 on the adapter's input, against
`train.dropout: 0`; for base_dtype, `train.base_dtype: fp32` against `int8` (both with
`train.precision: fp32`; PEFT scenarios only: full fine-tuning freezes nothing). Runs already in
bench/results/<choice's file>.json for a (scenario, seed) are replaced, others kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.io import write_json, write_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBJ, CONLL, GSM8K = DATA / "subj", DATA / "conll2003", DATA / "instruct"
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


def conll_sentences(path: Path) -> list[str]:
    """CoNLL blocks (token lines), -DOCSTART- markers left out."""
    blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
    return [b for b in blocks if b and not b.startswith("-DOCSTART-")]


def write_conll(blocks: list[str], path: Path) -> str:
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return str(path)


def write_instruct(rows: list[dict], path: Path) -> str:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
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
    ner = {
        "train": write_conll(
            rng.sample(conll_sentences(CONLL / "train.txt"), 2000), tmp / f"ner_{seed}.txt"
        ),
        "dev": write_conll(conll_sentences(CONLL / "valid.txt")[:1000], tmp / "ner_dev.txt"),
        "test": write_conll(conll_sentences(CONLL / "test.txt")[:1000], tmp / "ner_test.txt"),
    }
    gsm_train = json.loads((GSM8K / "gsm8k_train.json").read_text(encoding="utf-8"))
    gsm_test = json.loads((GSM8K / "gsm8k_test.json").read_text(encoding="utf-8"))
    gen = {
        "train": write_instruct(rng.sample(gsm_train, 256), tmp / f"gsm_{seed}.json"),
        "test": write_instruct(gsm_test[100:300], tmp / "gsm_test.json"),
    }
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
        "classification, MiniLM bitfit, 2000 rows": {
            **head,
            "method": {"name": "bitfit"},
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
        "NER, MiniLM lora, 2000 sentences": {
            "model": "minilm",
            "task": {"type": "token_classification", "scheme": "iob2"},
            "method": {"name": "lora"},
            "data": ner,
        },
        "instruction tuning, SmolLM2 lora, 256 GSM8K": {
            "model": "smollm2-135m-instruct",
            # response loss only: greedy generation of 200 answers would take longer than training
            "task": {"type": "generation", "eval_generate_max_samples": 0},
            "method": {"name": "lora"},
            "data": gen,
            # batch 8: at the default 32 a step holds about 19 GB (bench/results/memory_estimate.md)
            "train": {"epochs": 1, "batch_size": 8},
        },
    }


@dataclass(frozen=True)
class Choice:
    """Two settings of one default: `arms` name -> train settings (and LoRA's, for dropout)."""

    file: str
    arms: dict[str, dict]
    labels: tuple[str, str]
    intro: str
    peft_only: bool = False


CHOICES = {
    "dropout": Choice(
        "dropout_default",
        {
            # lmadapt's default before session 13: the model's dropout, 0.1 on LoRA's input
            "model": {"train": {"dropout": "model"}, "lora": {"dropout": 0.1}},
            "0.0": {"train": {"dropout": 0.0}, "lora": {}},
        },
        ("model's dropout", "dropout 0"),
        "Model's dropout = lmadapt's default until 2026-12-07 (`train.dropout: model`, LoRA's own "
        "0.1); dropout 0 = `train.dropout: 0`, what a frozen base trains with by default now.",
    ),
    "base_dtype": Choice(
        "base_dtype_default",
        {
            "fp32": {"train": {"precision": "fp32", "base_dtype": "fp32"}, "lora": {}},
            "int8": {"train": {"precision": "fp32", "base_dtype": "int8"}, "lora": {}},
        },
        ("fp32 base", "int8 base"),
        "fp32 base = `train.base_dtype: fp32`; int8 base = `train.base_dtype: int8` (the frozen "
        "linears multiply in int8 while training; dev and test are scored in fp32). Both "
        "`train.precision: fp32`, as `precision: auto` is on a CPU without bf16 units.",
        peft_only=True,
    ),
}
METRIC = {"token_classification": "f1", "generation": "loss"}  # else accuracy
SUFFIXES = ("accuracy", "f1", "loss")


def measure(name: str, cfg: dict, seed: int, arm: dict, out: Path) -> dict:
    """One run of scenario `name` (its config from `scenarios`) in `arm` (a choice's arm)."""
    t = {**cfg.get("train", {}), "seed": seed, **arm["train"]}
    method = dict(cfg["method"])
    if method["name"] == "lora":
        method.update(arm["lora"])
    run = build_run_config({**cfg, "method": method, "train": t, "output_dir": str(out)})
    start = time.perf_counter()
    m = train(run)
    split = "dev" if name.startswith("few-shot") else "test"
    metric = METRIC.get(cfg["task"]["type"], "accuracy")
    return {
        "seed": seed,
        f"{split}_{metric}": m[split][metric],
        "train_seconds": m["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="*", help="run only scenarios whose name holds one")
    ap.add_argument("--choice", default="dropout", choices=list(CHOICES))
    ap.add_argument("--arms", nargs="+", help="run only these arms of the choice")
    a = ap.parse_args(argv)
    choice = CHOICES[a.choice]
    path = RESULTS / f"{choice.file}.json"
    results: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for i, (name, cfg) in enumerate(scenarios(Path(tmp), seed).items()):
                if a.scenarios and not any(part in name for part in a.scenarios):
                    continue
                if choice.peft_only and cfg["method"]["name"] == "full":
                    continue
                for arm in a.arms or list(choice.arms):
                    out = Path(tmp) / f"run_{i}_{seed}_{arm}"  # one per scenario, seed, arm
                    runs = results.setdefault(name, {}).setdefault(arm, [])
                    runs[:] = [r for r in runs if r["seed"] != seed]
                    row = measure(name, cfg, seed, choice.arms[arm], out)
                    runs.append(row)
                    runs.sort(key=lambda r: r["seed"])
                    print(name, seed, arm, row, flush=True)
                    write_json(path, results)
    write_text(RESULTS / f"{choice.file}.md", markdown(results, a.choice))
    return results


def markdown(results: dict, chosen: str) -> str:
    choice = CHOICES[chosen]
    first, second = choice.labels
    lines = [
        f"`python -m bench.dropout_default --choice {chosen} --seeds 0 1 2` (runs kept by scenario "
        f"and seed), one run at a time on an idle machine. {choice.intro} Accuracy and F1: higher "
        "is better; loss: lower.",
        "",
        f"| scenario | metric | {first} | {second} | per-seed difference (2nd - 1st) "
        "| train s (1st / 2nd) | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by in results.items():
        keep, zero = (by.get(arm, []) for arm in choice.arms)
        if not keep or not zero:
            continue
        metric = next(k for k in keep[0] if k.endswith(SUFFIXES))
        seeds = sorted({r["seed"] for r in keep} & {r["seed"] for r in zero})
        pairs = [
            [next(r[metric] for r in rs if r["seed"] == s) for rs in (keep, zero)] for s in seeds
        ]
        diffs = ", ".join(f"{z - k:+.4f}" for k, z in pairs)
        acc = [mean(p[i] for p in pairs) for i in (0, 1)]
        secs = [mean(r["train_seconds"] for r in rs) for rs in (keep, zero)]
        lines.append(
            f"| {name} | {metric} (mean) | {acc[0]:.4f} | {acc[1]:.4f} | {diffs} | "
            f"{secs[0]:.0f} / {secs[1]:.0f} | {len(seeds)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
