"""`lmadapt prompt` shows its scoring progress on stderr as the trainer does (issue #30: a
755-sentence zero-shot run printed nothing for 23 minutes after the model loaded)."""

from __future__ import annotations

import re

from lmadapt.prompting.runner import run_prompt
from tests.prompting.conftest import prompt_config


def test_prompt_scoring_shows_a_progress_bar(tiny_llama, sst_files, tmp_path, capsys):
    run_prompt(prompt_config(tiny_llama, sst_files, tmp_path, k=0, calibration="none"))
    err = capsys.readouterr().err
    assert re.search(r"score: 100%.*\b16/16 .*query/s", err), err  # one query per dev sentence
