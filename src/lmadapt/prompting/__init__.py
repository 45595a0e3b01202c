"""Prompt learning without training: templates, verbalizers, demonstrations, calibration.

The runner (and its metrics/report imports) loads lazily: tasks.prompt_classification imports
templates and verbalizers from here while the task registry itself is still being built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmadapt.prompting.config import PromptConfig, load_prompt_config


def run_prompt(
    config: PromptConfig | str | Path | dict[str, Any], overrides: list[str] | None = None
) -> dict[str, Any]:
    """Evaluate a frozen model by prompting and write the output dir; see runner.run_prompt."""
    from lmadapt.prompting.runner import run_prompt as run

    return run(config, overrides)


__all__ = ["PromptConfig", "load_prompt_config", "run_prompt"]
