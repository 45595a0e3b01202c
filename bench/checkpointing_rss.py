"""Peak RSS of one SmolLM2-135M LoRA training step with and without train.gradient_checkpointing,
each in its own fresh process, one after the other. Writes bench/results/checkpointing_rss.json.

python -m bench.checkpointing_rss [--batch 4 --length 512 --threads 2]

A step is what the training loop does: forward (logits at the loss positions), weighted CE,
backward, AdamW step. The step's own peak is read from the kernel (VmHWM, reset through
/proc/self/clear_refs just before the step), so loading the GGUF, whose peak can exceed the
step's, does not hide the difference; the process's lifetime peak is reported too.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _vm(field: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rows(n: int, words: int) -> list[dict]:
    """Instruction rows whose responses are about `words` words: the loss reads most tokens."""
    body = " ".join(f"step {i} adds {i} to the total" for i in range(words // 6))
    return [
        {"instruction": f"add the numbers up to {i}", "input": "", "output": body} for i in range(n)
    ]


def one(checkpointing: bool, batch: int, length: int, threads: int) -> dict:
    """One step in this process; returns its figures."""
    import torch

    from lmadapt.api import prepare
    from lmadapt.config import build_run_config
    from lmadapt.inference import model_inputs
    from lmadapt.methods import build_method
    from lmadapt.session import apply_method, peak_rss_mb, seed_everything, set_threads
    from lmadapt.train.loop import set_dropout

    set_threads(threads)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "train.json").write_text(json.dumps(_rows(batch, length)))
    config = build_run_config(
        {
            "model": "smollm2-135m-instruct",
            "task": {"type": "generation", "max_length": length},
            "method": {"name": "lora"},
            "data": {"train": str(tmp / "train.json")},
            "train": {"batch_size": batch, "precision": "fp32", "dropout": 0.0},
            "output_dir": str(tmp / "run"),
        }
    )
    data = prepare(config)
    seed_everything(0)
    base = data.task.build_model(data.spec)
    model = apply_method(base, build_method(config.method), data.task, checkpointing)
    set_dropout(model, 0.0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    feats = data.features["train"][:batch]
    tokens = sum(len(f["input_ids"]) for f in feats)
    batch_t = data.task.collator(data.tokenizer)(feats)
    rss_before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the step's own peak from here
    t0 = time.perf_counter()
    out = model(**model_inputs(batch_t), **data.task.forward_kwargs(model, batch_t))
    loss = data.task.loss(out.logits, batch_t)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    return {
        "gradient_checkpointing": checkpointing,
        "loss": loss.item(),
        "rss_before_step_mb": round(rss_before, 1),
        "step_peak_rss_mb": round(_vm("VmHWM"), 1),
        "step_extra_mb": round(_vm("VmHWM") - rss_before, 1),
        "process_peak_rss_mb": round(peak_rss_mb(), 1),
        "step_seconds": round(seconds, 2),
        "batch": batch,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=["on", "off"], help="(internal) run one mode here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "on", args.batch, args.length, args.threads)))
        return
    runs = []
    for mode in ("off", "on"):  # each in a fresh process, one after the other
        cmd = [sys.executable, "-m", "bench.checkpointing_rss", "--one", mode]
        cmd += ["--batch", str(args.batch), "--length", str(args.length)]
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    off, on = runs
    result = {
        "machine": f"{platform.machine()}, {platform.system()}",
        "command": "python -m bench.checkpointing_rss " + " ".join(sys.argv[1:]),
        "runs": runs,
        "step_peak_saved_mb": round(off["step_peak_rss_mb"] - on["step_peak_rss_mb"], 1),
        "same_loss": abs(off["loss"] - on["loss"]) <= 1e-5 * abs(off["loss"]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpointing_rss.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
