"""A saved LoRA run is a plain PEFT adapter: transformers + peft alone reproduce its predictions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadapt.api import predict, train
from lmadapt.config import build_run_config

TEXTS = ["the film was good", "the plot was awful", "a lovely cast and a dull ending", "fine"]


def _plain_peft_probs(base_dir: str, run_dir: str, num_labels: int) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, f"{run_dir}/model").eval()
    tok = AutoTokenizer.from_pretrained(f"{run_dir}/model")
    with torch.no_grad():
        logits = model(**tok(TEXTS, return_tensors="pt", padding=True)).logits
    return torch.softmax(logits, -1).numpy()


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_plain_peft_reproduces_lmadapt_predictions(model, run_config, tiny_bert, minilm_dir):
    base = tiny_bert if model == "tiny" else minilm_dir
    cfg = run_config(
        model=base if model == "tiny" else "minilm",
        train={"max_steps": 6, "eval_every": 3, "precision": "auto", "lr": 1e-3},
    )
    metrics = train(build_run_config(cfg))
    run_dir = metrics["run_dir"]
    labels = json.loads(Path(run_dir, "run.json").read_text())["task"]["labels"]
    ours = predict(run_dir, TEXTS)
    theirs = _plain_peft_probs(base, run_dir, len(labels))
    for row, p in zip(ours, theirs):
        assert row["label"] == labels[int(p.argmax())]
        assert np.allclose([row["probabilities"][n] for n in labels], p, atol=2e-6)
    # the adapter really changed the model: the head alone would not give these logits
    assert not np.allclose(theirs[0], theirs[1])
