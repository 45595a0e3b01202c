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


def test_prompt_based_classifier_is_served_at_classify(tiny_llama, sst_files, tmp_path):
    """Its task once reported kind 'prompting', which /v1/classify refused; the task now says
    where it is served, and the answers are those of `lmadapt predict`."""
    from fastapi.testclient import TestClient

    from lmadapt.serve.app import create_app
    from lmadapt.serve.settings import ServeSettings

    method = {"name": "lora", "lr": 5e-3, "target_modules": ["all-linear"]}
    metrics = train(build_run_config(_config(tiny_llama, sst_files, tmp_path, method)))
    texts = ["the film was great", "a dull and tedious plot"]
    with TestClient(create_app([metrics["run_dir"]], ServeSettings())) as client:
        r = client.post("/v1/classify", json={"texts": texts})
        assert r.status_code == 200, r.text
        served = r.json()["results"]
        assert client.post("/v1/ner", json={"texts": texts}).status_code == 400
    expected = predict(metrics["run_dir"], texts)
    assert [s["label"] for s in served] == [e["label"] for e in expected]
    for s, e in zip(served, expected):
        assert s["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)


@pytest.mark.parametrize(
    "task",
    [
        {},  # single-token words: one row per example
        {  # several tokens per word with the test tokenizer: one row per verbalizer word
            "template": {"output": "Sentiment:{label}"},
            "verbalizer": {"0": "negative", "1": "positive"},
        },
    ],
)
def test_the_prompt_command_scores_as_the_untrained_task_does(
    tiny_llama, sst_files, tmp_path, task
):
    """One prompt-classification stack: zero-shot `lmadapt prompt` (KV-prefix scorer) and the
    trainable task before any step (its collator and the model's forward) give each dev example
    the same label probabilities."""
    from lmadapt.inference import Encoded
    from lmadapt.models import load_tokenizer, resolve_model
    from lmadapt.prompting.runner import run_prompt
    from lmadapt.tasks import build_task
    from lmadapt.tasks.configs import PromptClassificationConfig

    prompt = {
        "model": tiny_llama,
        "data": {"dev": str(sst_files["dev"])},
        "output_dir": str(tmp_path / "prompt"),
        **task,
    }
    run_prompt(prompt)
    lines = (tmp_path / "prompt" / "predictions.jsonl").read_text().splitlines()
    scored = [json.loads(x)["probabilities_uncalibrated"] for x in lines]

    t = build_task(PromptClassificationConfig(**{"template": "sentiment", **task}))
    spec = resolve_model(tiny_llama)
    tok, model = load_tokenizer(spec), t.build_model(spec).eval()
    examples = t.read(str(sst_files["dev"]))
    data = Encoded(t.encode(examples, tok), examples, t.collator(tok), 4)
    trained_path = t.predict_model(model, data)
    assert len(trained_path) == len(scored) == 16
    for a, b in zip(trained_path, scored):
        assert a["probabilities"] == pytest.approx(b, abs=1e-5)
