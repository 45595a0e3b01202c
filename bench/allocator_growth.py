"""Why a run's peak memory rises each time its longest batch shape comes back (#34): plain
transformers + peft, no lmadapt code in the loop.

    python -m bench.allocator_growth

MiniLM with LoRA (r=8 on query/value, as peft's SEQ_CLS default), AdamW, bf16 autocast, batches
of 32 random token ids: one of 48 tokens, then shorter ones (8-33 tokens), a 47-token batch,
shorter ones again, a 48-token batch; the schedule twice. Each variant in a fresh process: the
process's peak RSS (VmHWM) after each long batch, and the time of the whole schedule. Variants:
glibc as it comes; `malloc_trim(0)` after every step; glibc's mmap threshold fixed at 1 MB and
at 128 KB (`mallopt(M_MMAP_THRESHOLD)`; fixing it also turns off glibc's dynamic threshold).
Writes bench/results/allocator_growth.{json,md}.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SHORT = [10, 20, 15, 30, 12] * 4
LATER = [8, 25, 33, 17] * 5
SCHEDULE = ([48, *SHORT, 47, *LATER, 48]) * 2
VARIANTS = {
    "glibc default": {},
    "malloc_trim(0) after every step": {"trim": True},
    "mmap threshold 1 MB": {"mmap_kb": 1024},
    "mmap threshold 128 KB": {"mmap_kb": 128},
}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _hwm_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise KeyError("VmHWM")


def child(variant: str) -> dict:
    settings = VARIANTS[variant]
    libc = ctypes.CDLL("libc.so.6")
    if "mmap_kb" in settings:
        libc.mallopt(M_MMAP_THRESHOLD, settings["mmap_kb"] * 1024)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lmadapt.models import resolve_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    path = resolve_model("minilm").path
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(length: int) -> None:
        ids = torch.randint(1000, 2000, (32, length))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        torch.nn.functional.cross_entropy(out.logits.float(), torch.zeros(32).long()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if settings.get("trim"):
            libc.malloc_trim(0)

    peaks = []
    t0 = time.perf_counter()
    for length in SCHEDULE:
        step(length)
        if length >= 47:
            peaks.append(_hwm_mb())
    return {"peak_after_long_batches_mb": peaks, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2])))
        return
    rows = {}
    for variant in VARIANTS:
        done = subprocess.run(
            [sys.executable, "-m", "bench.allocator_growth", "--child", variant],
            capture_output=True,
            text=True,
            check=True,
        )
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(variant, rows[variant], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allocator_growth.json").write_text(
        json.dumps({"command": "python -m bench.allocator_growth", "variants": rows}, indent=2)
        + "\n"
    )
    lines = [
        "| allocator | peak RSS after each 47-48 token batch, MB | schedule s |",
        "|---|---|---|",
    ]
    for variant, r in rows.items():
        peaks = " -> ".join(str(p) for p in r["peak_after_long_batches_mb"])
        lines.append(f"| {variant} | {peaks} | {r['seconds']} |")
    (RESULTS / "allocator_growth.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
