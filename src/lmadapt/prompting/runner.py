"""`run_prompt`: evaluate a frozen model by prompting and write a run directory
(predictions.jsonl, metrics.json, report.md and plots/), like a training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmadapt.errors import ConfigError
from lmadapt.io import atomic_dir, write_json, write_text, write_yaml
from lmadapt.prompting.config import PromptConfig, load_prompt_config
from lmadapt.prompting.modes import MODES
from lmadapt.rundir import RunDir, check_output_dir, mark
from lmadapt.schema import to_dict
from lmadapt.session import resolve_device, set_threads


def run_prompt(
    config: PromptConfig | str | Path | dict, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run a prompting evaluation and write output_dir; returns the metrics.json content."""
    cfg = config if isinstance(config, PromptConfig) else load_prompt_config(config, overrides)
    if cfg.mode not in MODES:
        raise ConfigError("mode", f"unknown {cfg.mode!r}; one of: {', '.join(MODES.names())}")
    resolve_device(cfg.device)  # a missing GPU is refused before anything is read or loaded
    out = check_output_dir(cfg.output_dir, cfg.overwrite, inputs=to_dict(cfg))
    set_threads(cfg.threads)
    with atomic_dir(out) as tmp:
        mark(tmp, "prompt")
        outcome = MODES.get(cfg.mode).impl(cfg, tmp)
        write_yaml(RunDir(tmp).config, to_dict(cfg))
        write_text(tmp / "predictions.jsonl", "".join(_json(r) + "\n" for r in outcome.rows))
        lines = [
            f"# lmadapt prompt run `{out.name}`",
            "",
            f"- **model**: {cfg.model}",
            f"- **mode**: {cfg.mode}",
            f"- **demonstrations**: k={cfg.k}" + (f", {cfg.selection}" if cfg.k else ""),
            "- **template**: "
            + ", ".join(t if isinstance(t, str) else "inline" for t in cfg.templates),
            "",
        ]
        lines += [s + "\n" for s in outcome.sections]
        lines += [f"![{p.stem}]({p.relative_to(tmp).as_posix()})" for p in outcome.images]
        lines += ["", "## Reproduce", "", "```", f"lmadapt prompt {out / 'config.yaml'}", "```", ""]
        write_text(RunDir(tmp).report, "\n".join(lines))
        metrics = {"output_dir": str(out), **outcome.metrics}
        write_json(RunDir(tmp).metrics, metrics)
    return metrics


def _json(row: dict[str, Any]) -> str:

    return json.dumps(row, ensure_ascii=False)
