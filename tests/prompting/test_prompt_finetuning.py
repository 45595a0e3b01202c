"""The prompt_classification task trains through lmadapt.api.train like any other task."""

from __future__ import annotations

import json

import pytest

from lmadapt.api import predict, train
from lmadapt.config import build_run_config


def _config(tiny_llama, sst_files, tmp_path, method, **task):
    return {
        "model": tiny_llama,
        "task": {"type": "prompt_classification", "template": "sentiment", **task},
        "method": method,
        "data": {"train": str(sst_files["train"]), "dev": str(sst_files["dev"])},
        "train": {
            "max_steps": 12,
            "batch_size": 64,  # full batch: the loss curve is not batch noise
            "eval_every": 12,
            "log_every": 1,
            "warmup_ratio": 0.0,
            "precision": "fp32",
            "threads": 1,
            "group_by_length": False,
        },
        "output_dir": str(tmp_path / "run"),
    }


@pytest.mark.parametrize(
    ("method", "task"),
    [
        ({"name": "lora", "lr": 5e-3, "target_modules": ["all-linear"]}, {}),
        # no-space words are several tokens with the test tokenizer: the expanded-row path
        (
            {"name": "full", "lr": 1e-3},
            {
                "template": {"output": "Sentiment:{label}"},
                "verbalizer": {"0": "negative", "1": "positive"},
            },
        ),
    ],
)
def test_prompt_finetuning_loss_goes_down(tiny_llama, sst_files, tmp_path, method, task):
    metrics = train(build_run_config(_config(tiny_llama, sst_files, tmp_path, method, **task)))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert metrics["task"] == "prompt_classification" and "accuracy" in metrics["dev"]
    rows = predict(metrics["run_dir"], ["the film was great"])
    assert rows[0]["label"] in ("0", "1") and set(rows[0]["probabilities"]) == {"0", "1"}
