"""Distillation from a prompted LLM: its distribution is the prompt run's; no gold labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from lmadapt.distill import run_distill
from lmadapt.distill.runner import build_distill_config
from lmadapt.distill.teachers import build_teacher
from lmadapt.errors import ConfigError
from lmadapt.prompting.runner import run_prompt
from tests.prompting.conftest import prompt_config


def _prompt_yaml(tmp_path, tiny_llama, sst_files, **over):
    cfg = prompt_config(
        tiny_llama, sst_files, tmp_path, seeds=[0], output_dir=str(tmp_path / "prompt"), **over
    )
    path = tmp_path / "prompt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _distill(tmp_path, tiny_bert, sst_files, prompt_path, **over):
    cfg = {
        "teacher": {"type": "prompt", "config": str(prompt_path)},
        "use_gold_labels": False,
        "model": tiny_bert,
        "task": {"type": "classification", "text_column": "sentence"},
        "method": {"name": "full"},
        "data": {"train": str(sst_files["train"]), "dev": str(sst_files["dev"])},
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "precision": "fp32", "threads": 1},
        "output_dir": str(tmp_path / "student"),
        **over,
    }
    return build_distill_config(cfg)


def test_prompt_teacher_gives_the_prompt_runs_calibrated_distribution(
    tiny_llama, sst_files, tmp_path
):
    path = _prompt_yaml(tmp_path, tiny_llama, sst_files)
    run_prompt(path, ["seeds=[0]"])
    lines = (tmp_path / "prompt" / "predictions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    expected = np.array([[r["probabilities_calibrated"][n] for n in ("0", "1")] for r in rows])

    teacher = build_teacher(_distill(tmp_path, "minilm", sst_files, path).options.teacher)
    from lmadapt.prompting.config import load_prompt_config
    from lmadapt.prompting.sources import prompt_tasks

    dev = prompt_tasks(load_prompt_config(path))[0].read(str(sst_files["dev"]))
    got = teacher.label_distribution(dev)
    assert teacher.labels == ["0", "1"] and got.shape == (16, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)  # predictions are rounded to 6 places
    assert "2-shot balanced, calibrated (contextual)" in teacher.name


def test_distil_prompt_teacher_without_gold_labels(
    tiny_llama, tiny_lm, tiny_bert, sst_files, tmp_path
):
    path = _prompt_yaml(tmp_path, tiny_llama, sst_files, k=0)
    m = run_distill(_distill(tmp_path, tiny_bert, sst_files, path))
    assert m["use_gold_labels"] is False and m["train_samples"] == 64
    # the teacher is the prompted LLM: its dev scores are the prompt run's (calibrated, zero-shot)
    prompted = run_prompt(path)["summary"]["calibrated"]
    shared = m["teacher_dev"].keys() & prompted.keys()  # the student's report adds ece
    assert {"accuracy", "macro_f1"} <= shared
    assert {k: m["teacher_dev"][k] for k in shared} == pytest.approx(
        {k: prompted[k]["mean"] for k in shared}
    )
    assert m["teacher_params"] == sum(p.numel() for p in tiny_lm[0].parameters())
    assert "zero-shot" in m["teacher"]
    assert (tmp_path / "student" / "report.md").read_text().count("teacher") >= 2


def test_prompt_teacher_needs_verbalizer_mode(tiny_llama, sst_files, tmp_path):
    path = _prompt_yaml(tmp_path, tiny_llama, sst_files, mode="embedding", calibration="none")
    cfg = _distill(tmp_path, "minilm", sst_files, path)
    with pytest.raises(ConfigError, match="'mode'"):
        build_teacher(cfg.options.teacher)
