"""Memory flat in data size, for a whole run (#23, #34): lmadapt's feature cache vs HF Trainer +
`datasets` on synthetic SST-2 files of growing size, and `lmadapt predict --file` on them.
Writes bench/results/data_scale.json and .md.

python -m bench.data_scale [--rows 4000 100000 1000000 5000000] [--impl lmadapt hf]
                           [--predict 4000 5000000] [--work /tmp/lmadapt-data-scale]

Each file is made by the bench (never committed) from /work/shared/data/sst2/train.tsv: every
row joins the first half of one SST-2 sentence to the second half of another with the same
label, so lengths and vocabulary stay SST-2's. For each size and each side, two runs in fresh
processes, one after the other: cold (empty cache) and warm (the cache the cold run left). Each
is a whole run as a user has it, the settings of configs/sst2_lora.yaml: LoRA (r=16, alpha=32,
all linear layers, lr 1e-3, dropout 0) on MiniLM, batch 32, 20 optimizer steps, the SST-2 dev
set (872 rows) evaluated at the end, the model saved (lmadapt: and its report written). Each
run reports:

- peak_rss_mb: the whole process's peak RSS (VmHWM, read as it leaves), and per phase
  (`phases`: the highest VmRSS a 10 ms sampler saw in: prepare, model (load and adapt), train
  (the 20 steps and the evaluation on dev), finish (save, final evaluation, report));
- prepare_s: reading, validating and tokenizing the file into the cache (cold), or finding and
  checking the cache (warm): lmadapt's `prepare`, the peer's `load_dataset` + `map` (the
  tokenizer's first load is outside it on both sides);
- first_step_s: from the process's launch to the end of optimizer step 1;
- longest: the longest training example in tokens (lmadapt; its batch comes first, where the
  memory of a step peaks: a larger file holds longer extremes).

lmadapt batches by length (its default, from the stored lengths); the peer samples at random
(its default: its length grouping reads every example's length into a Python list first).

--predict: `lmadapt predict RUN --file FILE` (the CLI, in a fresh process, output to /dev/null)
on files of those sizes, with RUN a random 2-layer, 32-wide BERT (MiniLM's tokenizer) trained 5
steps on the 4,000-row file, since MiniLM would take hours over 5×10^6 rows here: the file is
read, tokenized and predicted as MiniLM's would be; peak_rss_mb and wall_s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
DEV = SST2.with_name("dev.tsv")
STEPS = 20
BATCH = 32
MAX_LENGTH = int(os.environ.get("BENCH_MAX_LENGTH", "128"))
"""Tokens an example is cut to (both sides' default, 128, unless --max-length)."""


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


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


class Probe:
    """What a child reports: phase peaks from a sampler thread, the time of step 1, and at the
    end the whole process's peak."""

    def __init__(self, launched: float, out: Path):
        self.launched, self.out = launched, out
        self.figures: dict = {"phases": {}}
        self.phase = "start"
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        phases = self.figures["phases"]
        while True:
            rss = round(_status_mb("VmRSS"), 1)
            phases[self.phase] = max(phases.get(self.phase, 0.0), rss)
            time.sleep(0.01)

    def enter(self, phase: str) -> None:
        time.sleep(0.02)  # the sampler sees the phase before it
        self.phase = phase

    def step(self, step: int) -> None:
        if step == 1:
            self.figures["first_step_s"] = round(time.time() - self.launched, 2)

    def done(self) -> None:
        self.enter("done")
        self.figures["peak_rss_mb"] = round(_status_mb("VmHWM"), 1)
        self.figures["wall_s"] = round(time.time() - self.launched, 2)
        self.out.write_text(json.dumps(self.figures))


def child_lmadapt(file: Path, probe: Probe) -> None:
    import lmadapt.api as api
    from lmadapt.config import build_run_config
    from lmadapt.hooks import Hook
    from lmadapt.models import load_tokenizer, resolve_model

    # the tokenizer's first load (and the imports behind it) outside prepare_s, as the peer's
    load_tokenizer(resolve_model("minilm"))
    real = api.prepare

    def timed(*args, **kwargs):
        probe.enter("prepare")
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        probe.figures["prepare_s"] = round(time.perf_counter() - t0, 2)
        probe.enter("model")
        return out

    api.prepare = timed

    class Phases(Hook):
        def on_train_start(self, trainer) -> None:
            probe.figures["longest"] = int(trainer.lengths.max())
            probe.enter("train")

        def on_step_end(self, trainer) -> None:
            probe.step(trainer.state.step)

        def on_train_end(self, trainer) -> None:
            probe.enter("finish")

    config = {
        "model": "minilm",
        "task": {"type": "classification", "text_column": "sentence", "max_length": MAX_LENGTH},
        "method": {"name": "lora", "r": 16, "alpha": 32, "target_modules": ["all-linear"]},
        "data": {"train": str(file), "dev": str(DEV)},
        "train": {
            "max_steps": STEPS,
            "batch_size": BATCH,
            "lr": 1e-3,
            "dropout": 0.0,
            "eval_every": STEPS,
            "seed": 42,
            "log_every": 10,
        },
        "output_dir": str(Path(os.environ["LMADAPT_CACHE"]).parent / "runs" / str(os.getpid())),
    }
    api.train(build_run_config(config), hooks=[Phases()])
    probe.done()


def child_hf(file: Path, probe: Probe) -> None:
    import tempfile

    import datasets
    import numpy as np
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

    def load(data_file: Path) -> datasets.Dataset:
        ds = datasets.load_dataset(
            "csv",
            data_files=str(data_file),
            delimiter="\t",
            quoting=3,  # csv.QUOTE_NONE: SST-2 quotes are text
            keep_default_na=False,
            split="train",
        )
        return ds.map(
            lambda b: tok(b["sentence"], truncation=True, max_length=MAX_LENGTH),
            batched=True,
            remove_columns=["sentence"],
        ).rename_column("label", "labels")

    probe.enter("prepare")
    t0 = time.perf_counter()
    ds = load(file)
    probe.figures["prepare_s"] = round(time.perf_counter() - t0, 2)
    probe.enter("model")
    dev = load(DEV)
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"
        ),
    )

    class Phases(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            probe.enter("train")

        def on_step_end(self, args, state, control, **kwargs):
            probe.step(state.global_step)

    runs = Path(os.environ["LMADAPT_CACHE"]).parent / "runs"  # removed by the parent
    out = tempfile.mkdtemp(prefix="bench-hf-", dir=runs)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=0.06,
        seed=42,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=STEPS,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    def accuracy(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=accuracy,
        callbacks=[Phases()],
    )
    trainer.train()
    probe.enter("finish")
    trainer.save_model(out)
    trainer.evaluate()
    probe.done()


def child_predict(file: Path, probe: Probe) -> None:
    """The CLI's predict, stdout to /dev/null (the parent's redirection)."""
    from lmadapt.cli import main

    probe.enter("predict")
    code = main(["predict", os.environ["BENCH_RUN"], "--file", str(file)])
    if code:
        raise SystemExit(code)
    probe.done()


CHILDREN = {"lmadapt": child_lmadapt, "hf": child_hf, "predict": child_predict}


def predict_run(work: Path, file: Path) -> Path:
    """A random tiny BERT trained 5 steps on `file` (see the module docstring)."""
    from bench.ui_load import tiny_bert
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    run = work / "predict-run"
    if (run / "metrics.json").exists():
        return run
    os.environ["LMADAPT_CACHE"] = str(work / "cache-predict-run")  # not the user's cache
    config = {
        "model": str(tiny_bert(work / "tiny-bert")),
        "task": {"type": "classification", "text_column": "sentence"},
        "method": {"name": "lora"},
        "data": {"train": str(file)},
        "train": {"max_steps": 5, "batch_size": BATCH, "precision": "fp32"},
        "output_dir": str(run),
        "overwrite": True,
    }
    train(build_run_config(config))
    return run


def run(impl: str, file: Path, cache: Path, timeout: int, extra_env: dict | None = None) -> dict:
    """One run in a fresh process; its figures, or why there are none."""
    out = cache.parent / f"{impl}-{os.getpid()}-{time.time_ns()}.json"
    runs = cache.parent / "runs"
    runs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "LMADAPT_CACHE": str(cache),
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "LMADAPT_TENSORBOARD": "0",
        **(extra_env or {}),
    }
    cmd = [sys.executable, "-m", "bench.data_scale", "--child", impl, "--file", str(file)]
    cmd += ["--out", str(out), "--launched", repr(time.time())]
    try:  # stdout dropped: predict prints a line a row
        done = subprocess.run(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout}s"}
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    if not out.exists():
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
    figures = json.loads(out.read_text())
    out.unlink()
    return figures


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())


PHASES = ("prepare", "model", "train", "finish")


def side(r: dict) -> str:
    """A row's side as the tables name it: the max_length where it is not the default."""
    return r["impl"] + (f", max_length {r['max_length']}" if r["max_length"] != 128 else "")


def markdown(rows: list[dict], predicted: list[dict]) -> str:
    """The runs table (peak growth against each side's smallest file), phase peaks, predict."""
    smallest: dict[tuple[str, int], dict] = {}
    for r in sorted(rows, key=lambda r: r["rows"]):
        if "error" not in r["cold"]:
            smallest.setdefault((r["impl"], r["max_length"]), r)
    out = [
        "| rows | side | whole-run peak RSS cold MB | warm MB | growth over "
        "the smallest file cold / warm MB | longest row (tokens) | prepare cold s | prepare warm "
        "s | first step cold s | first step warm s | run cold s | run warm s | cache MB |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        c, w = r["cold"], r["warm"]
        if "error" in c or "error" in w:
            out.append(f"| {r['rows']:,} | {side(r)} | {c.get('error') or w.get('error')} |")
            continue
        base = smallest[r["impl"], r["max_length"]]
        grow = (
            f"{c['peak_rss_mb'] - base['cold']['peak_rss_mb']:+.0f} / "
            f"{w['peak_rss_mb'] - base['warm']['peak_rss_mb']:+.0f}"
        )
        out.append(
            f"| {r['rows']:,} | {side(r)} | {c['peak_rss_mb']:.0f} | {w['peak_rss_mb']:.0f} | "
            f"{grow} | {c.get('longest', '-')} | {c['prepare_s']} | {w['prepare_s']} | "
            f"{c['first_step_s']} | {w['first_step_s']} | {c['wall_s']} | {w['wall_s']} | "
            f"{r['cache_mb']} |"
        )
    out += [
        "",
        "Peak VmRSS per phase, MB (cold / warm):",
        "",
        "| rows | side | " + " | ".join(PHASES) + " |",
        "|" + "---|" * (2 + len(PHASES)),
    ]
    for r in rows:
        c, w = r["cold"], r["warm"]
        if "error" in c or "error" in w:
            continue
        cells = [f"{c['phases'].get(p, 0):.0f} / {w['phases'].get(p, 0):.0f}" for p in PHASES]
        out.append(f"| {r['rows']:,} | {side(r)} | " + " | ".join(cells) + " |")
    if predicted:
        out += [
            "",
            "`lmadapt predict RUN --file` (tiny BERT run, see bench/data_scale.py):",
            "",
            "| rows | peak RSS MB | growth over the smallest file MB | wall s |",
            "|---|---|---|---|",
        ]
        first = next((p for p in predicted if "error" not in p["result"]), None)
        for p in predicted:
            res = p["result"]
            if "error" in res:
                out.append(f"| {p['rows']:,} | {res['error']} |")
                continue
            assert first is not None
            grow = res["peak_rss_mb"] - first["result"]["peak_rss_mb"]
            out.append(
                f"| {p['rows']:,} | {res['peak_rss_mb']:.0f} | {grow:+.0f} | {res['wall_s']} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[4000, 10**5, 10**6, 5 * 10**6])
    ap.add_argument("--impl", nargs="+", default=["lmadapt", "hf"], choices=["lmadapt", "hf"])
    ap.add_argument("--predict", type=int, nargs="*", default=[4000, 5 * 10**6])
    ap.add_argument("--max-length", type=int, default=128, help="task.max_length, both sides")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmadapt-data-scale"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        CHILDREN[args.child](args.file, Probe(args.launched, args.out))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / "data_scale.json"
    old = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = {(r["rows"], r["impl"], r["max_length"]): r for r in old.get("runs", [])}
    predicted = {p["rows"]: p for p in old.get("predict", [])}

    def save() -> None:
        ordered = sorted(
            runs.values(), key=lambda r: (r["max_length"], r["impl"] != "lmadapt", r["rows"])
        )
        by_rows = [predicted[n] for n in sorted(predicted)]
        result = {
            "command": "python -m bench.data_scale " + " ".join(sys.argv[1:]),
            "cpus": os.cpu_count(),
            "steps": STEPS,
            "batch": BATCH,
            "runs": ordered,
            "predict": by_rows,
        }
        RESULTS.mkdir(exist_ok=True)
        results_file.write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "data_scale.md").write_text(markdown(ordered, by_rows))

    length = {"BENCH_MAX_LENGTH": str(args.max_length)}
    for n in args.rows:
        file = generate(n, args.work / f"sst2_{n}.tsv")
        for impl in args.impl:
            cache = args.work / f"cache-{impl}-{n}-{args.max_length}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir()
            cold = run(impl, file, cache, args.timeout, length)
            size = cache_bytes(cache)
            warm = run(impl, file, cache, args.timeout, length)
            row = {
                "rows": n,
                "impl": impl,
                "max_length": args.max_length,
                "file_mb": round(file.stat().st_size / 2**20, 1),
                "cache_mb": round(size / 2**20, 1),
                "cold": cold,
                "warm": warm,
            }
            runs[n, impl, args.max_length] = row
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
            save()
    if args.predict:
        model_run = predict_run(args.work, generate(4000, args.work / "sst2_4000.tsv"))
        for n in args.predict:
            file = generate(n, args.work / f"sst2_{n}.tsv")
            cache = args.work / "cache-predict"
            cache.mkdir(exist_ok=True)
            result = run("predict", file, cache, args.timeout, {"BENCH_RUN": str(model_run)})
            predicted[n] = {"rows": n, "result": result}
            print(json.dumps(predicted[n]), flush=True)
            save()


if __name__ == "__main__":
    main()
