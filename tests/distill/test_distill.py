"""Distillation: loss formula, cached teacher (called once per split), truncated student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.config import build_run_config
from lmadapt.data.streams import Reread
from lmadapt.distill import run_distill
from lmadapt.distill import runner as distill_runner
from lmadapt.distill.loss import DistillationTask, soft_kl
from lmadapt.distill.runner import build_distill_config
from lmadapt.distill.teachers import build_teacher
from lmadapt.errors import ConfigError, DataError
from tests.conftest import sentiment_rows, write_csv
from tests.data.test_bad_rows import csv_with_bad_rows


class _Task:
    def loss(self, logits, batch):
        return F.cross_entropy(logits, batch["labels"])


def test_loss_is_hinton_mixture_and_unlabelled_rows_get_teacher_only():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 2, -100, 1])
    batch = {"labels": labels, "teacher_logits": t}
    d = DistillationTask(_Task(), alpha=0.3, temperature=2.0)
    ce = F.cross_entropy(s, labels.clamp(min=0), reduction="none")
    kl = 4.0 * F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="none").sum(-1)
    alpha = torch.tensor([0.3, 0.3, 0.0, 0.3])
    expected = (alpha * ce + (1 - alpha) * kl).mean()
    assert float(d.loss(s, batch)) == pytest.approx(float(expected), rel=1e-5)
    assert float(soft_kl(t, t, 2.0).abs().max()) < 1e-6
    # dev batches have no teacher logits: the task's own loss
    assert float(d.loss(s, {"labels": labels.clamp(min=0)})) == pytest.approx(
        float(ce.mean()), rel=1e-5
    )


@pytest.fixture
def teacher_run(tmp_path, run_config):
    cfg = run_config(
        method={"name": "full"},
        train={"epochs": 10, "lr": 3e-3, "eval_every": None},  # dev accuracy 1.0 (measured)
        output_dir=str(tmp_path / "teacher"),
    )
    train(build_run_config(cfg))
    return tmp_path / "teacher"


def _distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files, **over):
    cfg = {
        "teacher": {"type": "run", "run_dir": str(teacher_run)},
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "full"},
        "student_layers": 1,
        "alpha": 0.5,
        "data": {"train": str(sentiment_files["train"]), "dev": str(sentiment_files["dev"])},
        "train": {"epochs": 3, "batch_size": 8, "lr": 3e-3, "precision": "fp32", "threads": 1},
        "output_dir": str(tmp_path / "student"),
    }
    cfg.update(over)
    return build_distill_config(cfg)


def _counting(monkeypatch):
    calls: list[int] = []

    def build(cfg):
        teacher = build_teacher(cfg)
        inner = teacher.label_distribution

        def counted(examples):
            calls.append(len(examples))
            return inner(examples)

        teacher.label_distribution = counted
        return teacher

    monkeypatch.setattr(distill_runner, "build_teacher", build)
    return calls


def test_cached_teacher_and_truncated_student(
    tmp_path, tiny_bert, teacher_run, sentiment_files, monkeypatch
):
    calls = _counting(monkeypatch)
    m = run_distill(_distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files))
    # three epochs, yet the teacher saw the training rows once (plus dev once, for the report)
    assert calls == [64, 24]
    assert m["steps"] == 24 and m["student_params"] < m["teacher_params"]
    out = tmp_path / "student"
    # the student is the teacher's architecture less its second transformer block
    teacher = load_run(teacher_run).model
    dropped = sum(p.numel() for p in teacher.base_model.encoder.layer[1].parameters())
    assert m["teacher_params"] - m["student_params"] == dropped
    assert m["teacher_dev"]["accuracy"] >= 0.9  # an informative teacher: 1.0 measured
    # the dev metrics are the saved student's and the teacher's own, scored on the same file
    for key, run_dir in (("dev", out), ("teacher_dev", teacher_run)):
        ev, _ = evaluate(run_dir, sentiment_files["dev"])
        assert m[key] == pytest.approx({k: ev.metrics[k] for k in m[key]})
    rate = m["student_sentences_per_second"] / m["teacher_sentences_per_second"]
    assert m["speedup"] == pytest.approx(rate, abs=0.011)
    assert "Teacher vs student" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["student_layers"] == 1
    run = load_run(out)  # the output is a normal run directory of the student
    assert run.model.config.num_hidden_layers == 1
    assert len(predict(run, ["the film was great"])) == 1


def test_unlabelled_rows_and_no_gold_labels_with_lora(
    tmp_path, tiny_bert, teacher_run, sentiment_files, monkeypatch
):
    calls = _counting(monkeypatch)
    extra = write_csv(tmp_path / "extra.csv", [(t, "") for t, _ in sentiment_rows(16, seed=9)])
    cfg = _distill_cfg(
        tmp_path,
        tiny_bert,
        teacher_run,
        sentiment_files,
        method={"name": "lora", "r": 2},
        student_layers=None,
        use_gold_labels=False,
        unlabeled=str(extra),
    )
    m = run_distill(cfg)
    assert calls == [80, 24] and m["unlabeled_samples"] == 16
    assert m["student_trainable_params"] < m["student_params"]
    assert load_run(tmp_path / "student").config.method.name == "lora"


def test_rows_stream_through_the_teacher_a_chunk_at_a_time(
    tmp_path, tiny_bert, teacher_run, sentiment_files, monkeypatch, feature_cache
):
    """#34: no training row is held in memory: the teacher scores a chunk at a time into a
    feature store of the run's own, removed when the run ends; the student learns the same."""
    extra = write_csv(tmp_path / "extra.csv", [(t, "") for t, _ in sentiment_rows(16, seed=9)])
    cfg = {"method": {"name": "lora", "r": 2}, "student_layers": None, "unlabeled": str(extra)}
    whole = run_distill(
        _distill_cfg(tmp_path / "a", tiny_bert, teacher_run, sentiment_files, **cfg)
    )
    calls = _counting(monkeypatch)
    monkeypatch.setattr(distill_runner, "TEACHER_CHUNK", 24)
    held: list = []
    real = distill_runner._read
    monkeypatch.setattr(distill_runner, "_read", lambda *a: held.append(real(*a)) or held[-1])
    m = run_distill(_distill_cfg(tmp_path / "b", tiny_bert, teacher_run, sentiment_files, **cfg))
    data = held[0]
    assert isinstance(data.train, Reread) and isinstance(data.extra, Reread)  # not held
    assert isinstance(data.dev, list)
    assert calls == [24, 24, 24, 8, 24]  # 64 training rows, then 16 unlabelled; then dev
    assert m["train_samples"] == 64 and m["unlabeled_samples"] == 16
    assert m["dev"] == pytest.approx(whole["dev"], abs=1e-4)
    assert not list((feature_cache / "features").glob("scratch-*"))


def test_config_errors(tmp_path, tiny_bert, teacher_run, sentiment_files):
    with pytest.raises(ConfigError, match="'alpha'"):
        _distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files, alpha=1.5)
    with pytest.raises(ConfigError, match="'teacher'"):
        build_distill_config({"task": "classification", "data": {"train": "x.csv"}})
    cfg = _distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files, student_layers=5)
    with pytest.raises(ConfigError, match="student_layers"):
        run_distill(cfg)
    with pytest.raises(ConfigError, match="teacher.config"):
        _distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files, teacher={"type": "prompt"})


def test_label_distribution_rows_sum_to_one(teacher_run, sentiment_files):
    teacher = build_teacher(
        build_distill_config(
            {
                "teacher": {"type": "run", "run_dir": str(teacher_run)},
                "task": "classification",
                "data": {"train": "x.csv"},
            }
        ).options.teacher
    )
    examples = load_run(teacher_run).task.examples_from_texts(["good film", "bad plot"])
    p = teacher.label_distribution(examples)
    assert p.shape == (2, 2) and np.allclose(p.sum(-1), 1)


def test_student_methods_bring_their_hooks(tmp_path, tiny_bert, teacher_run, sentiment_files):
    """AdaLoRA's rank budget must prune a distilled student as it does in `lmadapt train` (the
    distill runner once skipped method hooks, so a student never pruned)."""
    cfg = _distill_cfg(
        tmp_path,
        tiny_bert,
        teacher_run,
        sentiment_files,
        method={"name": "adalora", "init_r": 4, "target_r": 1},
        student_layers=None,
    )
    run_distill(cfg)
    saved = json.loads((tmp_path / "student" / "model" / "adapter_config.json").read_text())
    ranks = [sum(mask) for mask in (saved["rank_pattern"] or {}).values()]
    assert ranks and min(ranks) < 4, saved["rank_pattern"]


# #29 item 14: data.bad_rows means the same here as in train
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_distill_honours_bad_rows(policy, tmp_path, tiny_bert, teacher_run, sentiment_files):
    bad_file, _ = csv_with_bad_rows(tmp_path / "bad_train.csv", good=40)
    data = {
        "train": str(bad_file),
        "dev": str(sentiment_files["dev"]),
        "bad_rows": policy,
        "max_bad_fraction": 0.2,
    }
    cfg = _distill_cfg(tmp_path, tiny_bert, teacher_run, sentiment_files, data=data)
    if policy == "error":
        with pytest.raises(DataError, match="3 bad rows"):
            run_distill(cfg)
        return
    metrics = run_distill(cfg)
    assert metrics["train_samples"] == 40
    assert metrics["bad_rows_skipped"]["train"] == 3
