"""Data larger than memory (#23): lmadapt's memory-mapped feature cache vs HF Trainer + `datasets`
on synthetic SST-2 files of growing size. Writes bench/results/data_scale.json and .md.

python -m bench.data_scale [--rows 10000 100000 1000000 5000000] [--work /tmp/lmadapt-data-scale]

Each file is made by the bench (never committed) from /work/shared/data/sst2/train.tsv: every
row joins the first half of one SST-2 sentence to the second half of another with the same
label, so lengths and vocabulary stay SST-2's. For each size and each side, two runs in fresh
processes, one after the other: cold (empty cache) and warm (the cache the cold run left). Each
run is LoRA (r=8, alpha=16) on MiniLM, batch 32, 20 optimizer steps, no dev set, and reports:

- prepare_s: reading, validating and tokenizing the file into the cache (cold), or finding and
  checking the cache (warm): lmadapt's `prepare`, the peer's `load_dataset` + `map` (the
  tokenizer's first load is outside it on both sides);
- first_step_s: from the process's launch to the end of optimizer step 1 (imports and model
  load included, the same for both sides);
- peak_rss_mb: the process's peak RSS (ru_maxrss) at step 20, the cold build included;
- rss_step20_mb: its RSS at step 20.

lmadapt batches by length (its default, from the stored lengths); the peer samples at random
(its default: its length grouping reads every example's length into a Python list first).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
STEPS = 20
BATCH = 32


def generate(n: int, path: Path, seed: int = 0) -> Path:
    """n synthetic rows (see the module docstring), written a block at a time."""
    if path.exists():
        return path
    halves: dict[str, tuple[list[str], list[str]]] = {"0": ([], []), "1": ([], [])}
    with open(SST2, encoding="utf-8") as f:
        next(f)
        for line in f:
            text, label = line.rstrip("\n").split("\t")
            words = text.split()
            if len(words) < 2:
                continue
            cut = len(words) // 2
            halves[label][0].append(" ".join(words[:cut]))
            halves[label][1].append(" ".join(words[cut:]))
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write("sentence\tlabel\n")
        for start in range(0, n, 100_000):
            block = []
            for _ in range(min(100_000, n - start)):
                label = "1" if rng.random() < 0.558 else "0"  # SST-2's label split
                heads, tails = halves[label]
                block.append(f"{rng.choice(heads)} {rng.choice(tails)}\t{label}\n")
            out.write("".join(block))
    tmp.rename(path)
    return path


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise KeyError("VmRSS")


class Probe:
    """What a child reports: time of step 1, RSS at step 20 (then it leaves at once)."""

    def __init__(self, launched: float, out: Path):
        self.launched, self.out = launched, out
        self.figures: dict = {}

    def step(self, step: int) -> None:
        if step == 1:
            self.figures["first_step_s"] = round(time.time() - self.launched, 2)
        if step == STEPS:
            self.figures["peak_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            )
            self.figures["rss_step20_mb"] = round(_rss_now_mb(), 1)
            self.out.write_text(json.dumps(self.figures))
            os._exit(0)  # the figures are out; saving a model is not part of the bench


def child_lmadapt(file: Path, probe: Probe) -> None:
    import lmadapt.api as api
    from lmadapt.config import build_run_config
    from lmadapt.hooks import Hook
    from lmadapt.models import load_tokenizer, resolve_model

    # the tokenizer's first load (and the imports behind it) outside prepare_s, as the peer's
    load_tokenizer(resolve_model("minilm"))
    real = api.prepare

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        probe.figures["prepare_s"] = round(time.perf_counter() - t0, 2)
        return out

    api.prepare = timed

    class StepHook(Hook):
        def on_step_end(self, trainer) -> None:
            probe.step(trainer.state.step)

    config = {
        "model": "minilm",
        "task": {"type": "classification", "text_column": "sentence"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
        "data": {"train": str(file)},
        "train": {"max_steps": STEPS, "batch_size": BATCH, "seed": 42, "log_every": 10},
        "output_dir": str(Path(os.environ["LMADAPT_CACHE"]).parent / "runs" / str(os.getpid())),
    }
    api.train(build_run_config(config), hooks=[StepHook()])


def child_hf(file: Path, probe: Probe) -> None:
    import tempfile

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lmadapt.models import resolve_model

    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    ds = datasets.load_dataset(
        "csv",
        data_files=str(file),
        delimiter="\t",
        quoting=3,  # csv.QUOTE_NONE: SST-2 quotes are text
        keep_default_na=False,
        split="train",
    )
    ds = ds.map(
        lambda b: tok(b["sentence"], truncation=True, max_length=128),
        batched=True,
        remove_columns=["sentence"],
    ).rename_column("label", "labels")
    probe.figures["prepare_s"] = round(time.perf_counter() - t0, 2)
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(
        model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1)
    )

    class StepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            probe.step(state.global_step)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=5e-4,
        weight_decay=0.01,
        warmup_steps=0.06,
        seed=42,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorWithPadding(tok),
        callbacks=[StepCallback()],
    ).train()


def run(impl: str, file: Path, cache: Path, timeout: int) -> dict:
    """One run in a fresh process; its figures, or why there are none."""
    out = cache.parent / f"{impl}-{os.getpid()}-{time.time_ns()}.json"
    env = {
        **os.environ,
        "LMADAPT_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "LMADAPT_TENSORBOARD": "0",
    }
    cmd = [sys.executable, "-m", "bench.data_scale", "--child", impl, "--file", str(file)]
    cmd += ["--out", str(out), "--launched", repr(time.time())]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not reach step {STEPS} in {timeout}s"}
    finally:
        shutil.rmtree(cache.parent / "runs", ignore_errors=True)
    if not out.exists():
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    figures = json.loads(out.read_text())
    out.unlink()
    return figures


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


def markdown(rows: list[dict]) -> str:
    head = (
        "| rows | side | prepare cold s | prepare warm s | cold/warm | first step cold s | "
        "first step warm s | peak RSS @20 cold MB | peak RSS @20 warm MB | RSS @20 warm MB | "
        "cache MB |\n|" + "---|" * 11 + "\n"
    )
    lines = []
    for r in rows:
        c, w = r["cold"], r["warm"]
        if "error" in c or "error" in w:
            lines.append(f"| {r['rows']:,} | {r['impl']} | {c.get('error') or w.get('error')} |")
            continue
        ratio = c["prepare_s"] / max(w["prepare_s"], 1e-3)
        lines.append(
            f"| {r['rows']:,} | {r['impl']} | {c['prepare_s']} | {w['prepare_s']} | "
            f"{ratio:.0f}x | {c['first_step_s']} | {w['first_step_s']} | {c['peak_rss_mb']} | "
            f"{w['peak_rss_mb']} | {w['rss_step20_mb']} | {r['cache_mb']} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[10**4, 10**5, 10**6, 5 * 10**6])
    ap.add_argument("--impl", nargs="+", default=["lmadapt", "hf"], choices=["lmadapt", "hf"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmadapt-data-scale"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    ap.add_argument("--child", choices=["lmadapt", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        probe = Probe(args.launched, args.out)
        {"lmadapt": child_lmadapt, "hf": child_hf}[args.child](args.file, probe)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / "data_scale.json"
    old = json.loads(results_file.read_text()) if results_file.exists() else {"runs": []}
    runs = {(r["rows"], r["impl"]): r for r in old["runs"]}
    for n in args.rows:
        file = generate(n, args.work / f"sst2_{n}.tsv")
        for impl in args.impl:
            cache = args.work / f"cache-{impl}-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            cold = run(impl, file, cache, args.timeout)
            size = cache_bytes(cache)
            warm = run(impl, file, cache, args.timeout)
            row = {
                "rows": n,
                "impl": impl,
                "file_mb": round(file.stat().st_size / 2**20, 1),
                "cache_mb": round(size / 2**20, 1),
                "cold": cold,
                "warm": warm,
            }
            runs[n, impl] = row
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            ordered = sorted(runs.values(), key=lambda r: (r["rows"], r["impl"] != "lmadapt"))
            result = {
                "command": "python -m bench.data_scale " + " ".join(sys.argv[1:]),
                "cpus": os.cpu_count(),
                "steps": STEPS,
                "batch": BATCH,
                "runs": ordered,
            }
            RESULTS.mkdir(exist_ok=True)
            results_file.write_text(json.dumps(result, indent=2) + "\n")
            (RESULTS / "data_scale.md").write_text(markdown(ordered))


if __name__ == "__main__":
    main()
