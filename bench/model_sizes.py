"""Memory and speed on real model shapes (random weights): lmadapt vs HF Trainer + peft, LoRA on
an fp32 base, on a bf16 base and QLoRA (NF4), each with and without gradient checkpointing.

python -m bench.model_sizes [--shapes smollm2-135m,...] [--impls lmadapt,hf] [--steps 20]
                            [--seq 512] [--only ROW ...] [--out DIR]

Each row runs in its own process (peak RSS = that process's ru_maxrss, loading included) and
prints one JSON line; the parent rewrites DIR/model_sizes.json and .md after every row, keeping
the rows it did not run (so `--only` resumes or redoes rows). Model directories are built once
under /tmp/lmadapt-shapes/<shape> (fp32 safetensors, the SmolLM2 tokenizer).

Every training row is exactly --seq tokens, batch 1, on both sides: GSM8K train problems
("Question: ... Answer: ...") joined into texts longer than --seq and read by lmadapt's
generation task as raw text (data_format text, cut at max_length), so every token trains. (With
batch 1, task.packing cannot fill a row: it packs a batch's own examples, and one GSM8K
problem is under 512 tokens.) The peer trains on the token ids lmadapt's prepare() made.
tokens/s is steady-state on both sides: from the end of step 1 to the end of the last step
(the same callback point, after the optimizer step), so loading and the first step are out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.run_one import (
    INSTRUCT_LORA,
    INSTRUCT_TARGETS,
    SHARED,
    hf_args,
    hf_features,
    instruct_lora_config,
)

RESULTS = Path(__file__).parent / "results"
CACHE = Path("/tmp/lmadapt-shapes")
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
    max_position_embeddings=8192,
)  # fmt: skip
SHAPES = {
    "smollm2-135m": ("LlamaConfig", SMOLLM2),
    "qwen2.5-0.5b-like": (
        "Qwen2Config",
        dict(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
            rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
        ),
    ),
    "llama-1.5b-like": (
        "LlamaConfig",
        dict(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
            num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
    ),
}  # fmt: skip
VARIANTS = {
    # lmadapt run-config settings; the peer's equivalent is in run_hf
    "lora-fp32": {"quantize": "none", "train": {"precision": "fp32", "base_dtype": "fp32"}},
    "lora-bf16": {"quantize": "none", "train": {"precision": "bf16", "base_dtype": "bf16"}},
    "qlora-nf4": {"quantize": "nf4", "train": {"precision": "fp32"}},
}
LR, WARMUP, SEED = 5e-4, 0.05, 42
NOTE = (
    "tokens/s: steady state (end of step 1 to end of the last step), batch 1, every row seq "
    "tokens. peak: the row process's ru_maxrss, loading included (it counts the page cache of the "
    "memory-mapped weight files transformers reads); peak anon: the largest RssAnon sampled every "
    "50 ms, the memory the run allocated itself. estimated peak: the peak RSS "
    "lmadapt printed before loading the model (what the process held then, plus weights, "
    "trainable state and activations). fp32 GFLOP/s: bench.machine's matmul figure at the start "
    "of the run that measured the row (this machine's speed varies; blank: not recorded then; "
    "two figures: lmadapt's and the peer's rows came from different runs, so their ratios "
    "mix machine speeds); otherwise a row's lmadapt and peer ran one after the other."
)
ESTIMATE = re.compile(r"lmadapt: memory: .*peak RSS about ([\d.]+) GiB")


def rows(shapes: list[str], impls: list[str]) -> list[dict]:
    return [
        {
            "name": f"{s}/{v}{'/ckpt' if c else ''}/{i}",
            "shape": s,
            "variant": v,
            "ckpt": c,
            "impl": i,
        }
        for s in shapes
        for v in VARIANTS
        for c in (False, True)
        for i in impls
    ]


def build_shape(shape: str) -> Path:
    """The model directory of `shape` (built once: random fp32 weights, SmolLM2's tokenizer)."""
    import torch
    import transformers

    from lmadapt.models import load_tokenizer, resolve_model

    out = CACHE / shape
    if (out / "shape.json").is_file():
        return out
    cls, kw = SHAPES[shape]
    config = getattr(transformers, cls)(vocab_size=49152, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{shape}-"))
    model.save_pretrained(tmp)
    load_tokenizer(resolve_model("smollm2-135m-instruct")).save_pretrained(tmp)
    (tmp / "shape.json").write_text(json.dumps({"shape": shape, "params": params}) + "\n")
    tmp.rename(out)  # whole or not at all
    return out


def data_file(seq: int, n: int) -> Path:
    """`n` texts of consecutive GSM8K train problems, each over 6 characters per token of `seq`
    (about twice what the tokenizer needs), so lmadapt cuts every one at exactly `seq` tokens."""
    path = CACHE / f"data/gsm8k-text-{seq}-{n}.json"
    if path.is_file():
        return path
    problems = json.loads((SHARED / "instruct/gsm8k_train.json").read_text())
    texts, cur = [], ""
    for p in problems:
        cur += f"Question: {p['instruction']}\nAnswer: {p['output']}\n\n"
        if len(cur) > 6 * seq:
            texts.append({"text": cur})
            cur = ""
            if len(texts) == n:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return path


def run_config(row: dict, model_dir: Path, args: argparse.Namespace, out: str) -> dict:
    v = VARIANTS[row["variant"]]
    return {
        "model": str(model_dir),
        "quantize": v["quantize"],
        "task": {
            "type": "generation",
            "data_format": "text",
            "max_length": args.seq,
            "eval_generate_max_samples": 0,
        },
        "method": {"name": "lora", **INSTRUCT_LORA, "target_modules": INSTRUCT_TARGETS},
        "data": {"train": str(data_file(args.seq, args.steps + 4))},
        "train": {
            "max_steps": args.steps,
            "batch_size": 1,
            "lr": LR,
            "warmup_ratio": WARMUP,
            "seed": SEED,
            "log_every": 5,
            "gradient_checkpointing": row["ckpt"],
            **v["train"],
        },
        "output_dir": out,
    }


def steady(ends: list[float], seq: int) -> float | None:
    """Tokens/s from the end of step 1 to the end of the last step."""
    return round((len(ends) - 1) * seq / (ends[-1] - ends[0]), 1) if len(ends) > 1 else None


def run_lmadapt(row: dict, model_dir: Path, args: argparse.Namespace) -> dict:
    from lmadapt.api import train
    from lmadapt.config import build_run_config
    from lmadapt.hooks import Hook

    ends: list[float] = []

    class Clock(Hook):
        def on_step_end(self, trainer) -> None:
            ends.append(time.perf_counter())

    class Tee:  # keeps what lmadapt prints to stderr (its memory line) and passes it on
        def __init__(self, inner):
            self.inner, self.text = inner, []

        def write(self, s: str) -> int:
            self.text.append(s)
            return self.inner.write(s)

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

    sys.stderr = tee = Tee(sys.stderr)
    out = tempfile.mkdtemp(prefix="bench-sizes-") + "/run"
    m = train(build_run_config(run_config(row, model_dir, args, out)), hooks=[Clock()])
    sys.stderr = tee.inner
    shutil.rmtree(Path(out).parent, ignore_errors=True)  # the adapter and checkpoint it wrote
    line = next((x for x in "".join(tee.text).splitlines() if ESTIMATE.search(x)), None)
    found = ESTIMATE.search(line) if line else None
    est = float(found.group(1)) * 1024 if found else None  # MB
    return {
        "tokens_per_second": steady(ends, args.seq),
        "whole_run_tokens_per_second": m["tokens_per_second"],
        "tokens": round(m["tokens_per_second"] * m["train_seconds"]),
        "trainable_params": m["trainable_params"],
        "estimate_line": line,
        "estimate_gib_printed": float(found.group(1)) if found else None,
        "estimate_mb": round(est, 1) if est else None,
    }


def run_hf(row: dict, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
    )

    from lmadapt.api import prepare
    from lmadapt.config import build_run_config

    cfg = run_config(row, model_dir, args, tempfile.mkdtemp(prefix="bench-hf-") + "/unused")
    prep = prepare(build_run_config(cfg))
    train_ds = hf_features(prep.features["train"])
    assert {len(f["input_ids"]) for f in train_ds} == {args.seq}, "rows not all --seq tokens"
    torch.manual_seed(SEED)
    variant, ckpt = row["variant"], row["ckpt"]
    kw: dict = {"dtype": torch.bfloat16 if variant == "lora-bf16" else torch.float32}
    if variant == "qlora-nf4":  # as lmadapt's on a CPU: double quantisation, fp32 compute
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kw["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    gc_kwargs = {"use_reentrant": False}  # lmadapt's kind of checkpointing
    if variant == "qlora-nf4":
        model = prepare_model_for_kbit_training(
            model, ckpt, gradient_checkpointing_kwargs=gc_kwargs
        )
    # peft keeps the adapters in fp32 on a bf16 base (autocast_adapter_dtype)
    lora = instruct_lora_config()
    model = get_peft_model(model, lora)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            ends.append(time.perf_counter())

    ns = argparse.Namespace(batch_size=1, epochs=1, seed=SEED)
    targs = hf_args(
        ns,
        {"bf16": variant == "lora-bf16"},
        LR,
        WARMUP,
        max_steps=args.steps,
        logging_steps=5,
        gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs=gc_kwargs,
    )
    collator = DataCollatorForSeq2Seq(prep.tokenizer, label_pad_token_id=-100)
    trainer = Trainer(
        model=model, args=targs, train_dataset=train_ds, data_collator=collator, callbacks=[Clock()]
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_second": steady(ends, args.seq),
        "whole_run_tokens_per_second": round(args.steps * args.seq / seconds, 1),
        "tokens": args.steps * args.seq,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def one_row(name: str, args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import peft  # noqa: F401  (both sides' libraries loaded: the RSS before any model is)
    import transformers  # noqa: F401

    import lmadapt.api  # noqa: F401

    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = next(r for r in rows(list(SHAPES), ["lmadapt", "hf"]) if r["name"] == name)
    model_dir = CACHE / row["shape"]
    anon = AnonPeak()
    result = (run_lmadapt if row["impl"] == "lmadapt" else run_hf)(row, model_dir, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mb"] = round(peak, 1)
    result["peak_anon_mb"] = round(anon.stop(), 1)
    result["import_rss_mb"] = round(imports, 1)
    if result.get("estimate_mb"):
        result["estimate_over_peak"] = round(result["estimate_mb"] / peak, 3)
    params = json.loads((model_dir / "shape.json").read_text())["params"]
    row.update(params=params, steps=args.steps, seq=args.seq, **result)
    print("RESULT " + json.dumps(row), flush=True)


class AnonPeak:
    """The largest anonymous RSS (/proc/self/status RssAnon) seen every 50 ms: the memory the
    run itself allocated, without the page cache of memory-mapped weight files that the peak
    RSS also counts."""

    def __init__(self) -> None:
        self.peak, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(0.05):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 1024


def _cell(d: dict, key: str, spec: str = ".0f") -> str:
    if "error" in d:
        return "error"
    return "" if d.get(key) is None else format(d[key], spec)


def _ratio(a: dict, b: dict, key: str) -> str:
    x, y = a.get(key), b.get(key)
    return f"{x / y:.2f}" if x and y else ""


def table(results: list[dict]) -> str:
    """One line per shape x variant x checkpointing: lmadapt and the peer side by side."""
    by = {r["name"]: r for r in results}
    head = (
        "| shape | params | variant | ckpt | steps x seq | lmadapt peak MB | peer peak MB | "
        "x peer peak | lmadapt tok/s | peer tok/s | x peer tok/s | estimated peak GiB | "
        "est / peak | lmadapt peak anon MB | peer peak anon MB | fp32 GFLOP/s |"
    )
    lines = [head, "|" + "---|" * 16]
    for key in dict.fromkeys(r["name"].rsplit("/", 1)[0] for r in results):
        a, b = by.get(key + "/lmadapt", {}), by.get(key + "/hf", {})
        r = a or b
        cells = [
            r["shape"],
            f"{r.get('params', 0):,}",
            r["variant"],
            "yes" if r["ckpt"] else "no",
            f"{r.get('steps')} x {r.get('seq')}",
            _cell(a, "peak_rss_mb"),
            _cell(b, "peak_rss_mb"),
            _ratio(a, b, "peak_rss_mb"),
            _cell(a, "tokens_per_second"),
            _cell(b, "tokens_per_second"),
            _ratio(a, b, "tokens_per_second"),
            _cell(a, "estimate_gib_printed", ".1f"),
            _cell(a, "estimate_over_peak", ".2f"),
            _cell(a, "peak_anon_mb"),
            _cell(b, "peak_anon_mb"),
            " / ".join(dict.fromkeys(_cell(d, "fp32_gflops") for d in (a, b) if d)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.model_sizes", description=__doc__)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--impls", default="lmadapt,hf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--only", nargs="*", default=[], help="row names (or parts of them) to run")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the .json and .md go")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run this row here
    p.add_argument("--build", help=argparse.SUPPRESS)  # internal: build this shape's directory
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.build:
        return print(build_shape(args.build))
    if args.row:
        return one_row(args.row, args)
    from bench.machine import machine_info

    shapes = args.shapes.split(",")
    chosen = [
        r
        for r in rows(shapes, args.impls.split(","))
        if not args.only or any(k in r["name"] for k in args.only)
    ]
    for shape in dict.fromkeys(r["shape"] for r in chosen):  # in its own process: RAM back
        subprocess.run([sys.executable, "-m", "bench.model_sizes", "--build", shape], check=True)
    machine = {**machine_info(), "cpus": os.cpu_count()}
    print(f"machine: {machine}", flush=True)
    path = args.out / "model_sizes.json"
    old = json.loads(path.read_text())["results"] if path.exists() else []
    results = {r["name"]: r for r in old}
    order = [r["name"] for r in rows(list(SHAPES), ["lmadapt", "hf"])]
    md = ""
    for row in chosen:
        cmd = [sys.executable, "-m", "bench.model_sizes", "--row", row["name"]]
        cmd += ["--steps", str(args.steps), "--seq", str(args.seq)]
        print(f"== {row['name']}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stderr[-3000:], file=sys.stderr)
            r = {**row, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        else:
            r = json.loads(line[len("RESULT ") :])
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M")
        r["fp32_gflops"] = machine["fp32_gflops"]  # this machine's speed varies from day to day
        results[row["name"]] = r
        print(json.dumps(r), flush=True)
        ordered = sorted(results.values(), key=lambda r: order.index(r["name"]))
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine, "results": ordered}, indent=2) + "\n")
        md = f"machine: {machine}\n\n{NOTE}\n\n{table(ordered)}\n"
        (args.out / "model_sizes.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
