"""One tiny run per task and its fp32 ONNX export, built once per test session (the fixtures
`onnx_runs` and `onnx_fp32` in tests/conftest.py) for the export and the serving tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmadapt import export_onnx
from lmadapt.api import train
from lmadapt.config import build_run_config
from tests.conftest import sentiment_rows, write_csv
from tests.tasks.test_question_answering import QUESTION, qa_rows
from tests.tasks.test_token_classification import ner_sentences, write_jsonl

TEXTS = {
    "classification": ["the film was good", "the plot was awful", "a lovely cast, a dull end"],
    "token_classification": ["Alice Smith flew to New York today .", "Bob flew to Lima ."],
    "question_answering": [
        json.dumps({"question": QUESTION, "context": "The code is red. It rained all day."}),
        json.dumps({"question": QUESTION, "context": "People walked. The code is blue."}),
    ],
}
TRAIN = {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "precision": "fp32", "threads": 1}


def train_run(root: Path, cfg: dict) -> str:
    """A run trained under `root`, with its own feature cache and no tensorboard."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMADAPT_CACHE", str(root / "cache"))
        mp.setenv("LMADAPT_TENSORBOARD", "0")
        return train(build_run_config({**cfg, "output_dir": str(root / "run")}))["run_dir"]


def cls_config(
    root: Path, model: str, method: str = "lora", dev_rows: int = 24, **train: object
) -> dict:
    return {
        "model": model,
        "task": {"type": "classification"},
        "method": {"name": method},
        "data": {
            "train": str(write_csv(root / "train.csv", sentiment_rows(64, seed=1))),
            "dev": str(write_csv(root / "dev.csv", sentiment_rows(dev_rows, seed=2))),
        },
        "train": {**TRAIN, **train},
    }


def build_runs(root: Path, tiny_bert: str) -> dict[str, str]:
    """One tiny run per task: classification with LoRA (merged on export), token classification
    with LoRA and no dev set, question answering fully fine-tuned (exported as it is)."""
    (root / "cls").mkdir()
    cls = train_run(root / "cls", cls_config(root / "cls", tiny_bert, eval_every=8))
    ner = root / "ner"
    ner.mkdir()
    train_rows = [{"tokens": w, "tags": t} for w, t in ner_sentences(48, seed=1)]
    ner_run = train_run(
        ner,
        {
            "model": tiny_bert,
            "task": {"type": "token_classification", "max_length": 16, "stride": 4},
            "method": {"name": "lora"},
            "data": {"train": str(write_jsonl(ner / "train.jsonl", train_rows))},
            "train": TRAIN,
        },
    )
    qa = root / "qa"
    qa.mkdir()
    qa_run = train_run(
        qa,
        {
            "model": tiny_bert,
            "task": {
                "type": "question_answering",
                "max_length": 48,
                "doc_stride": 8,
                "max_question_length": 8,
            },
            "method": {"name": "full"},
            "data": {
                "train": str(write_jsonl(qa / "train.jsonl", qa_rows(64, 1))),
                "dev": str(write_jsonl(qa / "dev.jsonl", qa_rows(24, 2))),
            },
            "train": {**TRAIN, "lr": 2e-3, "eval_every": 8},
        },
    )
    return {"classification": cls, "token_classification": ner_run, "question_answering": qa_run}


def export_each(runs: dict[str, str], root: Path) -> dict[str, tuple[dict, Path]]:
    """Each run exported in fp32: (what export_onnx returned, the directory)."""
    return {
        kind: (export_onnx.export_onnx(run, root / kind), root / kind) for kind, run in runs.items()
    }
