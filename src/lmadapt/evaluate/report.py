"""report.md and plots for a run: what a person reads first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import metrics_table
from lmadapt.io import write_text
from lmadapt.tasks.base import Evaluation


def training_curves(history: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """loss.png (train and dev loss) and metric.png (dev metric) from the run's log records."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    dev = [(r["step"], r["dev"]) for r in history if "dev" in r]
    written = []
    series: dict[str, tuple[list[float], list[float]]] = {}
    if train:
        series["train loss"] = ([s for s, _ in train], [v for _, v in train])
    if any("loss" in d for _, d in dev):
        pts = [(s, d["loss"]) for s, d in dev if "loss" in d]
        series["dev loss"] = ([s for s, _ in pts], [v for _, v in pts])
    if series:
        plots.curves(series, out_dir / "loss.png", "loss")
        written.append(out_dir / "loss.png")
    if dev:
        keys = [k for k in dev[0][1] if k != "loss"]
        series = {k: ([s for s, _ in dev], [d.get(k, float("nan")) for _, d in dev]) for k in keys}
        plots.curves(series, out_dir / "metrics.png", f"dev metrics (selection: {metric})")
        written.append(out_dir / "metrics.png")
    return written


def evaluation_section(title: str, ev: Evaluation, task: Any) -> str:
    body = [f"## {title}", "", metrics_table(ev.metrics)]
    extra = task.report(ev)
    if extra:
        body += ["", extra]
    return "\n".join(body)


def write_report(
    run_dir: Path,
    summary: dict[str, Any],
    sections: list[str],
    images: list[Path],
) -> Path:
    lines = [f"# lmadapt run `{run_dir.name}`", ""]
    for key, value in summary.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    lines += [s + "\n" for s in sections]
    if images:
        lines.append("## Plots\n")
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in images]
        lines.append("")
    lines += ["## Reproduce", "", "```", f"lmadapt train {run_dir / 'config.yaml'}", "```", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
