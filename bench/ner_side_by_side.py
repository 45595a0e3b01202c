"""NER learning speed, lmadapt vs HF Trainer at the peer's settings, then lmadapt's differences.

    .venv/bin/python -m bench.ner_side_by_side [--train-sentences 3400] [--epochs 3] [--seed 42]

A seeded sample of CoNLL-2003 training sentences (../shared/data/conll2003, not committed) trains
MiniLM (`method: full`) at the peer's settings: lr 5e-5, batch 32, linear decay, no warmup, no
weight decay, fp32, random batches, first subword labelled, gradient clipping at 1.0 (HF's
default). Dev entity F1 (seqeval, all 3,250 dev sentences) is read after every epoch. Then one
lmadapt difference at a time is switched back on (warmup, bf16 autocast, length-grouped batches,
weight decay), and finally lmadapt's plain defaults. Every run is its own process, one after
another; results go to bench/results/ner_side_by_side.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONLL = ROOT.parent / "shared" / "data" / "conll2003"
PEER = {"lr": 5e-5, "batch_size": 32}
# lmadapt at the peer's settings; each variant below puts back one of lmadapt's own defaults.
EQUAL = {
    "warmup_ratio": 0.0,
    "precision": "fp32",
    "group_by_length": False,
    "weight_decay": 0.0,
}
VARIANTS: dict[str, dict] = {
    "lmadapt, peer's settings": EQUAL,
    "+ warmup 0.06": {**EQUAL, "warmup_ratio": 0.06},
    "+ bf16 autocast": {**EQUAL, "precision": "auto"},
    "+ length-grouped batches": {**EQUAL, "group_by_length": True},
    "+ weight decay 0.01": {**EQUAL, "weight_decay": 0.01},
    "+ dropout 0": {**EQUAL, "dropout": 0.0},
    "lmadapt defaults": {},
    "lmadapt defaults, dropout 0": {"dropout": 0.0},
    "lmadapt, peer's settings + head lr 1e-3": {**EQUAL, "head_lr": 1e-3},
}


def read_sentences(path: Path) -> list[list[str]]:
    """CoNLL blocks (token lines), -DOCSTART- documents markers left out."""
    blocks, cur = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur = []
        elif not line.startswith("-DOCSTART-"):
            cur.append(line)
    if cur:
        blocks.append(cur)
    return blocks


def write_sample(n: int, out: Path) -> Path:
    blocks = read_sentences(CONLL / "train.txt")
    random.Random(0).shuffle(blocks)
    path = out / f"train_{n}.txt"
    path.write_text("\n\n".join("\n".join(b) for b in blocks[:n]) + "\n", encoding="utf-8")
    return path


def run_lmadapt(train: Path, epochs: int, opts: dict, out: Path, seed: int) -> dict:
    """One lmadapt run, or the finished one already in `out` (same settings) read back."""
    overrides = [
        "task.type=token_classification",
        "task.scheme=iob2",
        "method.name=full",
        f"data.train={train}",
        f"data.dev={CONLL / 'valid.txt'}",
        f"train.epochs={epochs}",
        f"train.lr={PEER['lr']}",
        f"train.batch_size={PEER['batch_size']}",
        "train.eval_batch_size=128",
        f"train.seed={seed}",
        f"output_dir={out}",
        "overwrite=true",
    ] + [f"train.{k}={v}" for k, v in opts.items()]
    if not (out / "metrics.json").is_file():
        base = out.parent / "base.yaml"
        base.write_text("model: minilm\n")
        cmd = [sys.executable, "-m", "lmadapt", "train", str(base), *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    f1 = [r["dev"]["f1"] for r in log if "dev" in r]
    wall = json.loads((out / "metrics.json").read_text())["wall_seconds"]
    return {"dev_f1_by_epoch": f1, "wall_seconds": round(wall, 1), "overrides": overrides[3:]}


def run_peer(train: Path, epochs: int, out: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "bench.ner_peer", str(train), str(CONLL / "valid.txt")]
    cmd += [str(epochs), str(PEER["lr"]), str(PEER["batch_size"]), str(out), str(seed)]
    start = time.perf_counter()
    line = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, env=_env())
    wall = time.perf_counter() - start
    result = json.loads(line.stdout.strip().splitlines()[-1])
    return {**result, "wall_seconds": round(wall, 1)}


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "LMADAPT_TENSORBOARD": "0"}


def markdown(results: dict, epochs: int) -> str:
    head = "| run | " + " | ".join(f"dev F1 epoch {e + 1}" for e in range(epochs))
    lines = [head + " | wall s |", "|---" * (epochs + 2) + "|"]
    for name, r in results["runs"].items():
        f1 = [f"{v:.3f}" for v in r["dev_f1_by_epoch"]]
        f1 += ["(stopped)"] * (epochs - len(f1))
        lines.append(f"| {name} | {' | '.join(f1)} | {r.get('wall_seconds', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-sentences", type=int, default=3400)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--only", nargs="*", help="run only these variants (and the peer if 'peer')")
    p.add_argument("--work", default="/tmp/ner_side_by_side")
    p.add_argument(
        "--seed",
        type=int,
        default=42,
        help="both sides' seed (runs of another seed are named '... (seed S)')",
    )
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = write_sample(args.train_sentences, work)
    out_json = RESULTS / "ner_side_by_side.json"
    # runs already measured are kept, so some can be re-run (or added) alone with --only
    results = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    results.update(machine=machine_info(), train_sentences=args.train_sentences)
    names = ["peer"] + list(VARIANTS)
    for name in args.only or names:
        out = work / f"run_{names.index(name)}_seed{args.seed}"
        if name == "peer":
            r = run_peer(train, args.epochs, out, args.seed)
            name = "HF Trainer (peer)"
        else:
            r = run_lmadapt(train, args.epochs, VARIANTS[name], out, args.seed)
        if args.seed != 42:
            name = f"{name} (seed {args.seed})"
        print(name, r["dev_f1_by_epoch"], r["wall_seconds"], flush=True)
        RESULTS.mkdir(exist_ok=True)
        # re-read before writing: another invocation may have added runs meanwhile
        if out_json.exists():
            results["runs"] = json.loads(out_json.read_text())["runs"]
        results["runs"][name] = r
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "ner_side_by_side.md").write_text(markdown(results, args.epochs))


if __name__ == "__main__":
    main()
