"""Compare adaptation methods on the same data: one training run per method, one table.

Each run is a separate `python -m lmadapt train` process, so its peak RSS is its own (peak RSS of
a process never goes down, so in-process runs would report a running maximum) and a crash in one
method does not lose the others.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmadapt.config import RunConfig, check_dev_needs, load_config
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.evaluate import plots
from lmadapt.io import write_json, write_text
from lmadapt.methods import METHODS
from lmadapt.rundir import MARKER, RunDir, check_output_dir, made_by_lmadapt, mark
from lmadapt.session import run_directory
from lmadapt.tasks import build_task

CHILD_GRACE = 10.0
"""Seconds a Ctrl-C'd method run gets to stop on its own before compare passes the signal on."""


def _train_child(cmd: list[str], log: Path) -> int:
    """Run one method's `lmadapt train` with its output in `log`; its exit code.

    A Ctrl-C reaches the child too (same terminal), which then finishes its step and saves a
    checkpoint, as `lmadapt train` does alone: compare waits for that (subprocess.run would kill
    it 0.25 s later, mid-save), passes the signal on if the child did not get it, then stops."""
    with open(log, "w", encoding="utf-8") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except KeyboardInterrupt:
            try:
                child.wait(timeout=CHILD_GRACE)
            except subprocess.TimeoutExpired:  # the signal reached compare alone
                child.send_signal(signal.SIGINT)
                child.wait()
            raise


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _method_configs(
    config_path: str | Path, out: Path, methods: list[str], overrides: list[str]
) -> dict[str, tuple[list[str], RunConfig]]:
    """Per method: the override list for its run and the checked config (fails before any run)."""
    runs = {}
    for name in methods:
        if name not in METHODS:
            raise ConfigError(
                "--methods", f"unknown method {name!r}; one of: {', '.join(METHODS.names())}"
            )
        # The method section is replaced whole: the base config's method options (r, ...) would
        # not fit other methods. Overrides after it still apply (e.g. train.max_steps).
        run_overrides = [f"method={name}", *overrides, f"output_dir={out / name}"]
        config = load_config(config_path, run_overrides)
        check_dev_needs(config)
        check_output_dir(config.output_dir, config.overwrite, inputs=config.to_dict())
        runs[name] = (run_overrides, config)
    return runs


def compare(
    config_path: str | Path, methods: list[str], overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train `config_path` once per method and write compare.md / .json / .png to output_dir."""
    overrides = list(overrides or [])
    if not methods:
        raise ConfigError("--methods", "give at least one method")
    if len(set(methods)) != len(methods):
        raise ConfigError("--methods", f"a method is listed twice: {','.join(methods)}")
    base = load_config(config_path, overrides)
    out = Path(base.output_dir)
    if out.is_dir() and not made_by_lmadapt(out):
        raise ConfigError(
            "output_dir",
            f"{out} exists and was not created by lmadapt (it has no {MARKER} marker); compare "
            "writes its table and one log per method there, replacing files of those names: "
            "choose another output_dir",
        )
    runs = _method_configs(config_path, out, methods, overrides)
    metric = base.train.metric or build_task(base.task).default_metric
    rows = []

    def kept() -> bool:
        """A method's run directory (train removes one with nothing to resume) or the table."""
        return any(p.is_dir() for p in out.iterdir()) or (out / "compare.json").is_file()

    with run_directory(out, "compare", create=not out.exists(), keep=kept):
        if not (out / MARKER).is_file():  # an empty directory given as output_dir
            mark(out, "compare")
        for i, (name, (run_overrides, config)) in enumerate(runs.items(), 1):
            print(f"[{i}/{len(runs)}] {name} ...", file=sys.stderr, flush=True)
            log = out / f"{name}.log"
            cmd = [sys.executable, "-m", "lmadapt", "train", str(config_path), *run_overrides]
            t0 = time.perf_counter()
            code = _train_child(cmd, log)
            wall = time.perf_counter() - t0
            row = _row(name, Path(config.output_dir), metric, wall, code, log)
            rows.append(row)
            dev = row["dev_metric"]
            outcome = f"dev {metric} {dev:.4f}" if dev is not None else "done, no dev metric"
            outcome = outcome if row["ok"] else f"FAILED, see {log}"
            print(f"[{i}/{len(runs)}] {name}: {outcome} ({wall:.0f}s)", file=sys.stderr, flush=True)

        result = {
            "config": str(config_path),
            "overrides": overrides,
            "output_dir": str(out),
            "metric": metric,
            "rows": rows,
        }
        write_json(out / "compare.json", result)
        done = [r for r in rows if r["ok"] and r["dev_metric"] is not None]
        chart = out / "compare.png"
        if done:
            plots.bars(
                [r["method"] for r in done],
                [r["dev_metric"] for r in done],
                chart,
                title=f"dev {metric} by method",
                ylabel=metric,
            )
        write_text(out / "compare.md", markdown(result, chart.name if done else None))
    failed = [r["method"] for r in rows if not r["ok"]]
    if failed:
        raise LmadaptError(
            f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); "
            f"logs in {out}, table in {out / 'compare.md'}"
        )
    return result


def _row(
    name: str, run_dir: Path, metric: str, wall: float, code: int, log: Path
) -> dict[str, Any]:
    metrics_file = RunDir(run_dir).metrics
    if code != 0 or not metrics_file.is_file():
        return {
            "method": name,
            "ok": False,
            "exit_code": code,
            "log": str(log),
            "run_dir": str(run_dir),
            "dev_metric": None,
        }
    m = json.loads(metrics_file.read_text(encoding="utf-8"))
    return {
        "method": name,
        "ok": True,
        "dev_metric": m.get("dev", {}).get(metric),
        "trainable_params": m["trainable_params"],
        "total_params": m["total_params"],
        "model_bytes": dir_bytes(RunDir(run_dir).model),
        "wall_seconds": round(wall, 1),
        "train_seconds": m["train_seconds"],
        "samples_per_second": m["samples_per_second"],
        "peak_rss_mb": m["peak_rss_mb"],
        "steps": m["steps"],
        "run_dir": str(run_dir),
        "log": str(log),
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def markdown(result: dict[str, Any], chart: str | None) -> str:
    metric = result["metric"]
    lines = [
        "# Method comparison",
        "",
        f"Config `{result['config']}`"
        + (f", overrides `{' '.join(result['overrides'])}`" if result["overrides"] else "")
        + ".",
        "Each method ran in its own process; wall time includes loading and evaluation; "
        "model/ size includes the tokenizer files.",
        "",
        f"| method | dev {metric} | trainable params | model/ size | wall time | samples/s "
        "| peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if not r["ok"]:
            lines.append(
                f"| {r['method']} | failed (exit {r['exit_code']}, log `{r['log']}`) | | | | | |"
            )
            continue
        dev = "-" if r["dev_metric"] is None else f"{r['dev_metric']:.4f}"
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(
            f"| {r['method']} | {dev} | {r['trainable_params']:,} ({share:.2f}%) "
            f"| {_size(r['model_bytes'])} | {r['wall_seconds']:.0f} s "
            f"| {r['samples_per_second']:.1f} | {r['peak_rss_mb']:.0f} MB |"
        )
    if chart:
        lines += ["", f"![dev {metric} by method]({chart})"]
    return "\n".join(lines) + "\n"
