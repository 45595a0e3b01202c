"""Where a training step's time goes, lmadapt vs HF Trainer + peft (#35): forward, backward,
optimizer, and everything else (batching and collation, loss outside the model, zero_grad,
clipping, the scheduler, logging: the loop's own overhead).

    .venv/bin/python -m bench.step_breakdown [--rows 4000] [--only lora]

Each row is `bench.run_one --breakdown` in its own process, one after another: the same
MiniLM on the same SST-2 rows, batch 32, one epoch, at the peer's best setting (length-grouped
batches) and lmadapt's defaults. The timers are the same for both sides and installed from
outside either library: torch's global module-forward hooks time the outermost forward while
gradients are on, `torch.autograd.backward` is wrapped, and torch's global optimizer-step hooks
time `optimizer.step()`. The rest of the training time (which leaves evaluation out on both
sides) is "other". Writes bench/results/step_breakdown.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import machine_info

RESULTS = Path(__file__).parent / "results"
ROWS: list[tuple[str, str, dict]] = [
    ("lora", "hf", {"group_by_length": True}),
    ("lora", "lmadapt", {}),
    ("bitfit", "hf", {"group_by_length": True}),
    ("bitfit", "lmadapt", {}),
    ("full", "hf", {"group_by_length": True}),
    ("full", "lmadapt", {}),
]
PHASES = ("forward", "backward", "optimizer", "other")


class Timers:
    """Seconds per phase, from hooks that see every framework's calls alike."""

    def __init__(self) -> None:
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.steps = 0
        self._depth = 0
        self._t = 0.0

    def install(self) -> None:
        import torch
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        def pre(module: Any, args: Any) -> None:
            if self._depth == 0:
                self._t = time.perf_counter()
            self._depth += 1

        def post(module: Any, args: Any, out: Any) -> None:
            self._depth -= 1
            if self._depth == 0 and torch.is_grad_enabled():  # training's, not evaluation's
                self.seconds["forward"] += time.perf_counter() - self._t

        register_module_forward_pre_hook(pre)
        register_module_forward_hook(post)
        backward = torch.autograd.backward

        def timed_backward(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return backward(*args, **kwargs)
            finally:
                self.seconds["backward"] += time.perf_counter() - t

        torch.autograd.backward = timed_backward  # Tensor.backward calls it by this name
        start = [0.0]

        def step_pre(opt: Any, args: Any, kwargs: Any) -> None:
            start[0] = time.perf_counter()

        def step_post(opt: Any, args: Any, kwargs: Any) -> None:
            self.seconds["optimizer"] += time.perf_counter() - start[0]
            self.steps += 1

        register_optimizer_step_pre_hook(step_pre)
        register_optimizer_step_post_hook(step_post)

    def per_step_ms(self, train_seconds: float) -> dict[str, float]:
        """Milliseconds per optimizer step of each phase; `other` = the training time the three
        timed phases do not cover (both sides' training time leaves evaluation out)."""
        steps = max(self.steps, 1)
        timed = sum(self.seconds[p] for p in ("forward", "backward", "optimizer"))
        other = train_seconds - timed
        out = {p: 1000 * self.seconds[p] / steps for p in ("forward", "backward", "optimizer")}
        out["other"] = 1000 * max(other, 0.0) / steps
        return {k: round(v, 2) for k, v in out.items()}


def run(method: str, impl: str, opts: dict, rows: int) -> dict:
    cmd = [sys.executable, "-m", "bench.run_one", "--impl", impl, "--method", method]
    cmd += ["--rows", str(rows), "--train-opts", json.dumps(opts), "--breakdown"]
    print("==", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{impl} {method}: exit {proc.returncode}")
    return json.loads(line[len("RESULT ") :])


def markdown(doc: dict) -> str:
    lines = [
        f"machine: {doc['machine']}",
        "",
        f"`{doc['command']}`, {doc['measured_at']}: ms per optimizer step (batch 32), MiniLM, "
        f"{doc['train_rows']:,} SST-2 rows, one epoch; `other` = the loop's own time (batching, "
        "loss outside the model, zero_grad, clipping, scheduler, logging).",
        "",
        "| method | run | forward | backward | optimizer | other | step | samples/s | dev acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        ms = r["step_ms"]
        step = sum(ms.values())
        name = "HF Trainer + peft, group_by_length" if r["impl"] == "hf" else "lmadapt defaults"
        lines.append(
            f"| {r['method']} | {name} | {ms['forward']:.1f} | {ms['backward']:.1f} | "
            f"{ms['optimizer']:.1f} | {ms['other']:.1f} | {step:.1f} | "
            f"{r['samples_per_second']:.1f} | {r['dev_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--only", nargs="*", help="methods to run (default all)")
    a = ap.parse_args(argv)
    doc = {
        "machine": machine_info(),
        "command": " ".join(["python -m bench.step_breakdown", *(argv or sys.argv[1:])]),
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "train_rows": a.rows,
        "rows": [
            run(method, impl, opts, a.rows)
            for method, impl, opts in ROWS
            if not a.only or method in a.only
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "step_breakdown.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "step_breakdown.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
