"""A runs root for the dashboard tests: tiny finished runs trained here (classification, chat,
NER, preference), and next to them the kinds of directory the dashboard must show without
crashing (running, interrupted, half-written, unparsable, continual, hpo) and a symlink leading
out of the root."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import sentiment_rows, write_csv


def _train(root: Path, data: Path, model: str, name: str, method: str) -> None:
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    cfg = {
        "model": model,
        "task": {"type": "classification"},
        "method": {"name": method},
        "data": {"train": str(data / "train.csv"), "dev": str(data / "dev.csv")},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "eval_every": 4,
            "log_every": 2,
            "precision": "fp32",
            "threads": 1,
        },
        "output_dir": str(root / name),
    }
    train(build_run_config(cfg))


def _train_chat(root: Path, tiny_llama: str) -> None:
    """A LoRA chat run of the tiny Llama on 8 alpaca rows, for the playground's streaming."""
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    rows = [
        {"instruction": f"what is {i} plus {i}?", "input": "", "output": f"it is {2 * i}"}
        for i in range(8)
    ]
    (root.parent / "chat.json").write_text(json.dumps(rows), encoding="utf-8")
    cfg = {
        "model": tiny_llama,
        "task": {"type": "generation", "max_length": 48, "max_new_tokens": 8},
        "method": {"name": "lora"},
        "data": {"train": str(root.parent / "chat.json")},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32", "threads": 1, "lr": 0.05},
        "output_dir": str(root / "chat-run"),
    }
    train(build_run_config(cfg))


def _train_ner(root: Path, tiny_bert: str) -> None:
    """An NER run of the toy names-and-places set (full fine-tuning learns it in seconds)."""
    from lmadapt.api import train
    from lmadapt.config import build_run_config
    from tests.tasks.test_token_classification import ner_sentences, write_conll

    data = write_conll(root.parent / "ner.conll", ner_sentences(48, seed=1))
    cfg = {
        "model": tiny_bert,
        "task": {"type": "token_classification", "max_length": 16, "stride": 4},
        "method": {"name": "full"},
        "data": {"train": str(data)},
        "train": {"epochs": 10, "batch_size": 8, "lr": 2e-3, "precision": "fp32", "threads": 1},
        "output_dir": str(root / "ner-run"),
    }
    train(build_run_config(cfg))


def _train_preference(root: Path, tiny_llama: str) -> None:
    """A DPO run of the tiny Llama on 8 pairs, 2 steps, dev scored after each (its rewards and
    margin curve)."""
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    pairs = [
        {"prompt": f"what is {i} plus {i}?", "chosen": f"it is {2 * i}", "rejected": "no idea"}
        for i in range(8)
    ]
    data = root.parent / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    cfg = {
        "model": tiny_llama,
        "task": {"type": "preference", "max_length": 48, "max_new_tokens": 4, "report_samples": 1},
        "method": {"name": "lora"},
        "data": {"train": str(data), "dev": str(data)},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "eval_every": 1,
            "log_every": 1,
            "lr": 0.05,
            "precision": "fp32",
            "threads": 1,
        },
        "output_dir": str(root / "dpo-run"),
    }
    train(build_run_config(cfg))


def _study(path: Path) -> None:
    """A real Optuna study as `lmadapt hpo` stores it (no training: the values are made up)."""
    import optuna

    from lmadapt.hpo import STUDY_NAME

    path.mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{path / 'study.db'}", study_name=STUDY_NAME, direction="maximize"
    )
    study.set_user_attr("fingerprint", {"objective": "maximize dev accuracy"})
    for i in range(2):
        trial = study.ask()
        trial.suggest_float("train.lr", 1e-5, 1e-2, log=True)
        for step in (4, 8):
            trial.report(0.5 + 0.1 * i + step / 100, step)
        study.tell(trial, 0.6 + 0.1 * i)
    (path / "report.md").write_text("# hpo\n")


@pytest.fixture(scope="session")
def ui_root(tmp_path_factory, tiny_bert, tiny_llama) -> Path:
    base = tmp_path_factory.mktemp("ui")
    data = base / "data"
    data.mkdir()
    write_csv(data / "train.csv", sentiment_rows(64, seed=1))
    write_csv(data / "dev.csv", sentiment_rows(24, seed=2))
    root = base / "runs"
    _train(root, data, tiny_bert, "lora-run", "lora")
    _train(root, data, tiny_bert, "bitfit-run", "bitfit")
    _train_chat(root, tiny_llama)
    _train_ner(root, tiny_bert)
    _train_preference(root, tiny_llama)

    for name, age in (("running", 0), ("interrupted", 3600)):
        shutil.copytree(root / "lora-run", root / name, ignore=shutil.ignore_patterns("model"))
        (root / name / "metrics.json").unlink()
        stamp = time.time() - age
        os.utime(root / name / "log.jsonl", (stamp, stamp))
    with open(root / "running" / "log.jsonl", "a") as f:
        f.write('{"step": 17, "epoch": 1, "loss": 0.25, "lr": 0.0001}\n{"step": 18, "ep')

    (root / "half-written").mkdir()
    (root / "half-written" / ".lmadapt-run").write_text('{"lmadapt": "train"}\n')
    (root / "bad-yaml").mkdir()
    (root / "bad-yaml" / "config.yaml").write_text("task: [unclosed\n  : :\n")
    shutil.copytree(root / "lora-run", root / "bad-json", ignore=shutil.ignore_patterns("model"))
    (root / "bad-json" / "metrics.json").write_text('{"dev": {"accuracy": 0.')
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("not a run\n")

    cont = root / "stream"
    cont.mkdir()
    (cont / ".lmadapt-run").write_text('{"lmadapt": "continual"}\n')
    (cont / "config.yaml").write_text("model: tiny\nstrategy:\n  name: ewc\n")
    summary = {
        "strategy": "ewc",
        "model": "tiny",
        "tasks": ["a", "b"],
        "metrics": {"a": "accuracy", "b": "accuracy"},
        "matrix": [[0.9, None], [0.7, 0.8]],
        "average_accuracy": 0.75,
        "steps": [{"step": 0, "task": "a"}, {"step": 1, "task": "b"}],
        "wall_seconds": 3.0,
    }
    (cont / "continual.json").write_text(json.dumps(summary))
    _study(root / "search_hpo")

    secret = base / "outside" / "secret-run"
    shutil.copytree(root / "lora-run", secret, ignore=shutil.ignore_patterns("model"))
    (root / "escape").symlink_to(secret, target_is_directory=True)
    (root / "lora-run" / "plots" / "leak.png").symlink_to(secret / "plots" / "loss.png")
    return root
