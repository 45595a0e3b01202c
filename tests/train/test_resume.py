"""Crash safety: a run killed with SIGKILL resumes to the same result as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmadapt.api import resume, train
from lmadapt.config import build_run_config
from lmadapt.errors import LmadaptError
from lmadapt.train.loop import Hook, TrainingInterrupted
from tests.conftest import sentiment_rows, write_csv


def _config(run_config, tmp_path, name):
    data = write_csv(tmp_path / "big.csv", sentiment_rows(400, seed=5))
    return run_config(
        data={"train": str(data)},
        train={
            "epochs": 4,
            "batch_size": 8,
            "eval_every": 25,
            "checkpoint_every": 10,
            "log_every": 5,
            "threads": 1,
            "precision": "fp32",
        },
        output_dir=str(tmp_path / name),
    )


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(run_config, tmp_path):
    reference = train(build_run_config(_config(run_config, tmp_path, "ref")))

    cfg = _config(run_config, tmp_path, "killed")
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from lmadapt.cli import main; sys.exit(main())",
            "train",
            str(cfg_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = Path(cfg["output_dir"]) / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(ckpt.glob("step-*/state.json")):
            time.sleep(0.3)  # die somewhere between checkpoints, not on one
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (Path(cfg["output_dir"]) / "metrics.json").exists()

    resumed = resume(cfg["output_dir"])
    assert resumed["resumed"] and resumed["steps"] == reference["steps"]
    assert resumed["dev"] == reference["dev"]
    a = load_file(f"{reference['run_dir']}/model/adapter_model.safetensors")
    b = load_file(f"{resumed['run_dir']}/model/adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    evals = [
        json.loads(x)["step"]
        for x in (Path(cfg["output_dir"]) / "log.jsonl").read_text().splitlines()
        if '"dev"' in x
    ]
    assert evals == sorted(set(evals)), "log has duplicated evaluations after resume"


def test_keeps_only_the_newest_checkpoints(run_config, tmp_path):
    cfg = _config(run_config, tmp_path, "keep")
    cfg["train"].update(epochs=1, keep_checkpoints=2)
    train(build_run_config(cfg))
    kept = sorted(p.name for p in (Path(cfg["output_dir"]) / "checkpoints").glob("step-*"))
    assert kept == ["step-00000040", "step-00000050"]
    assert not list(Path(cfg["output_dir"]).rglob("*.tmp"))


def test_resume_refuses_finished_or_foreign_dirs(run_config, tmp_path):
    m = train(build_run_config(run_config(train={"max_steps": 2})))
    with pytest.raises(LmadaptError, match="already finished"):
        resume(m["run_dir"])
    with pytest.raises(LmadaptError, match="not an lmadapt run"):
        resume(tmp_path)


class SigintAt(Hook):
    """A user's Ctrl-C, as a real SIGINT in the middle of a step (after the forward pass, before
    the backward), `times` times in a row."""

    def __init__(self, step: int, times: int = 1):
        self.step, self.times = step, times

    def on_train_start(self, trainer):
        self.trainer = trainer

    def loss_term(self, model, batch, outputs):
        if self.trainer.state.step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
            self.step = -1
        return None


def _adapter(run_dir) -> dict:
    return load_file(f"{run_dir}/model/adapter_model.safetensors")


def test_ctrl_c_mid_step_checkpoints_that_step_and_resumes_exactly(run_config, tmp_path):
    def cfg(name):
        c = _config(run_config, tmp_path, name)
        c["train"].update(max_steps=36, eval_every=12, checkpoint_every=10)
        return build_run_config(c)

    reference = train(cfg("ref"))

    with pytest.raises(TrainingInterrupted, match="interrupted at step 14.*--resume") as e:
        train(cfg("once"), hooks=[SigintAt(13)])
    assert "step-00000014" in str(e.value)
    resumed = resume(tmp_path / "once")
    assert resumed["dev"] == reference["dev"]
    a, b = _adapter(reference["run_dir"]), _adapter(resumed["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a second Ctrl-C aborts the step at once: no checkpoint of a half-done step, the last one
    # (step 10) stays and resumes exactly too
    with pytest.raises(TrainingInterrupted, match="aborted during step 14.*step-00000010"):
        train(cfg("twice"), hooks=[SigintAt(13, times=2)])
    assert sorted(p.name for p in (tmp_path / "twice" / "checkpoints").glob("step-*")) == [
        "step-00000010"
    ]
    again = resume(tmp_path / "twice")
    c = _adapter(again["run_dir"])
    assert all(torch.equal(a[k], c[k]) for k in a)


class SigintInFinalEvaluation(Hook):
    """A user's Ctrl-C while the final weights are being evaluated, after the last step."""

    def on_train_start(self, trainer):
        self.trainer = trainer

    def on_evaluate(self, trainer, metrics):
        if trainer.state.step == trainer.total_steps():
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_the_final_evaluation_is_honoured_and_resumes(run_config, tmp_path):
    def cfg(name):
        c = _config(run_config, tmp_path, name)
        c["train"].update(max_steps=6, eval_every=4)
        return build_run_config(c)

    reference = train(cfg("ref"))
    with pytest.raises(TrainingInterrupted, match="interrupted at step 6.*--resume"):
        train(cfg("late"), hooks=[SigintInFinalEvaluation()])
    assert not (tmp_path / "late" / "metrics.json").exists()
    resumed = resume(tmp_path / "late")
    assert resumed["dev"] == reference["dev"]
    a, b = _adapter(reference["run_dir"]), _adapter(resumed["run_dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)
