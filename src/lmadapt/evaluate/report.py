"""report.md and plots for a run: what a person reads first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmadapt.data.validation import MAX_LISTED, BadRow
from lmadapt.evaluate import plots
from lmadapt.evaluate.metrics import Evaluation
from lmadapt.io import write_text
from lmadapt.rundir import RunDir

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task


def cell(value: object, limit: int = 200) -> str:
    """Free text as one markdown table cell: on one line, at most `limit` characters."""
    text = " ".join(str(value).split())
    return (text if len(text) <= limit else text[: limit - 1] + "…").replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; cells are written as they are (see `cell` for free text)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def classification_report_markdown(ev: Evaluation) -> str:
    """Per-class scores and the confusion matrix, where the evaluation has them."""
    parts = []
    per_class = ev.details.get("per_class")
    if per_class:
        rows = [
            [name, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", v["support"]]
            for name, v in per_class.items()
        ]
        parts.append(
            "### Per class\n\n"
            + markdown_table(["label", "precision", "recall", "f1", "support"], rows)
        )
    cm = ev.details.get("confusion_matrix")
    if cm is not None:
        labels = ev.details["labels"]
        rows = [[f"**{g}**", *row] for g, row in zip(labels, cm)]
        parts.append(
            "### Confusion matrix (rows: gold, columns: predicted)\n\n"
            + markdown_table(["gold \\ pred", *labels], rows)
        )
    return "\n\n".join(parts)


STRUCTURED = ("labels", "per_class", "per_type", "confusion_matrix")
"""The evaluation details written to evaluations.json (all JSON already; the rest, such as raw
logits or error-analysis rows, stays in the report)."""


def evaluation_record(ev: Evaluation) -> dict[str, Any]:
    """One split's entry of evaluations.json: its metrics and structured details."""
    return {"metrics": ev.metrics, **{k: ev.details[k] for k in STRUCTURED if k in ev.details}}


def metrics_table(metrics: dict[str, float]) -> str:
    return markdown_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()])


def training_curves(history: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """loss.png (train and dev loss) and metrics.png (every other dev metric that changes, one
    panel each) from the run's log records."""
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
        steps = [s for s, _ in dev]
        series = {}
        for key in dev[0][1]:
            values = [d.get(key, float("nan")) for _, d in dev]
            # a metric that never moves (the untrained model's, measured beside it) is no curve
            if key != "loss" and (len(values) == 1 or len(set(values)) > 1):
                series[key] = (steps, values)
        if series:
            plots.panels(series, out_dir / "metrics.png", f"dev metrics (selection: {metric})")
            written.append(out_dir / "metrics.png")
    return written


def evaluation_section(title: str, ev: Evaluation, task: Task) -> str:
    body = [f"## {title}", "", metrics_table(ev.metrics)]
    extra = task.report(ev)
    if extra:
        body += ["", extra]
    return "\n".join(body)


def bad_rows_metrics(bad_rows: Mapping[str, Sequence[BadRow]]) -> dict[str, dict[str, int]]:
    """metrics.json entry: rows left out per split, e.g. {"bad_rows_skipped": {"train": 4}}."""
    return {"bad_rows_skipped": {split: len(rows) for split, rows in bad_rows.items()}}


def bad_rows_section(
    bad_rows: Mapping[str, Sequence[BadRow]], limit: int = MAX_LISTED
) -> str | None:
    """report.md section on the rows data.bad_rows=skip left out, so whoever reads the results
    knows what they were not computed on; None when no row was left out."""
    if not any(bad_rows.values()):
        return None

    listed = [(split, row) for split, rows in bad_rows.items() for row in rows]
    counts = markdown_table(["split", "rows skipped"], [[s, len(r)] for s, r in bad_rows.items()])
    rows = [
        [cell(c) for c in (split, f"`{r.file}`", r.line or "", r.field or "", r.message)]
        for split, r in listed[:limit]
    ]
    lines = ["## Skipped rows", "", "Rows left out by `data.bad_rows: skip`:", "", counts, ""]
    lines.append(markdown_table(["split", "file", "line", "field", "problem"], rows))
    if len(listed) > limit:
        lines += ["", f"... and {len(listed) - limit} more."]
    return "\n".join(lines)


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
    path = RunDir(run_dir).report
    write_text(path, "\n".join(lines))
    return path
