"""Fault injection: `lmadapt train` killed, interrupted or out of disk at chosen moments (mid-step,
mid-save). Each case checks what the user sees (exit code, one line, no traceback), what is left
on disk (nothing half-written, or a run that resumes), and that `--resume` then reproduces an
uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmadapt.api import train
from lmadapt.config import build_run_config
from tests.conftest import sentiment_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow  # real processes killed and resumed: ~2 min


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    """A 36-step LoRA run (checkpoints every 10 steps, dev every 12) and its uninterrupted
    result; each case trains the same config into its own directory."""
    root = tmp_path_factory.mktemp("faults")
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": {
            "train": str(write_csv(root / "train.csv", sentiment_rows(400, seed=5))),
            "dev": str(write_csv(root / "dev.csv", sentiment_rows(24, seed=2))),
        },
        "train": {
            "max_steps": 36,
            "batch_size": 8,
            "eval_every": 12,
            "checkpoint_every": 10,
            "log_every": 5,
            "threads": 1,
            "precision": "fp32",
        },
        "output_dir": str(root / "reference"),
    }
    reference = train(build_run_config(cfg))
    return root, cfg, reference


def _lmadapt(fault: str | None, n: int, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "LMADAPT_TENSORBOARD": "0",
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
    }
    cmd = [sys.executable, "-m", "lmadapt", *args]
    if fault is not None:
        cmd = [sys.executable, "-m", "tests.faults_child", fault, str(n), "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _one_clean_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    last = lines[-1]
    assert last.startswith("lmadapt: "), proc.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def _config_file(setup, name: str) -> tuple[Path, Path]:
    root, cfg, _ = setup
    out = root / name
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(out)}))
    return path, out


def _tmp_leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


def _resumes_to_reference(setup, out: Path) -> None:
    proc = _lmadapt(None, 0, "train", "--resume", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not _tmp_leftovers(out), "resume left the crashed writes' temp files behind"
    reference = setup[2]
    ref = load_file(f"{reference['run_dir']}/model/adapter_model.safetensors")
    got = load_file(f"{out}/model/adapter_model.safetensors")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert json.loads((out / "metrics.json").read_text())["dev"] == reference["dev"]


def test_ctrl_c_mid_step(setup):
    path, out = _config_file(setup, "sigint")
    proc = _lmadapt("sigint", 16, "train", str(path))
    _one_clean_line(proc, 130, "interrupted at step 17", "checkpoint", f"--resume {out}")
    assert (out / "checkpoints" / "step-00000017" / "state.json").is_file()
    _resumes_to_reference(setup, out)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step(setup, seed):
    step = random.Random(seed).randint(11, 33)  # after the first checkpoint
    path, out = _config_file(setup, f"sigkill-{seed}")
    proc = _lmadapt("sigkill", step, "train", str(path))
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    _resumes_to_reference(setup, out)


@pytest.mark.parametrize(
    "n, torn",
    [
        (4, "best.safetensors"),  # dev evaluation at step 12 writes the best weights
        (6, "step-00000020"),  # the step-20 checkpoint, between two of its files
    ],
)
def test_sigkill_during_a_save(setup, n, torn):
    path, out = _config_file(setup, f"sigkill-save-{n}")
    proc = _lmadapt("sigkill-save", n, "train", str(path))
    assert proc.returncode == -signal.SIGKILL
    leftovers = _tmp_leftovers(out)
    assert leftovers and all(torn in p.name for p in leftovers), leftovers
    _resumes_to_reference(setup, out)


def test_disk_full_after_a_checkpoint_says_how_to_resume(setup):
    path, out = _config_file(setup, "enospc-late")
    proc = _lmadapt("enospc", 5, "train", str(path))
    _one_clean_line(proc, 2, "No space left on device", f"lmadapt train --resume {out}")
    assert not _tmp_leftovers(out)
    _resumes_to_reference(setup, out)


def test_disk_full_before_any_checkpoint_leaves_nothing(setup):
    path, out = _config_file(setup, "enospc-early")
    proc = _lmadapt("enospc", 1, "train", str(path))
    _one_clean_line(proc, 2, "No space left on device", "run directory was removed")
    assert not out.exists()


def test_unwritable_checkpoint_directory_is_one_line_and_resumable(setup):
    path, out = _config_file(setup, "eacces")
    proc = _lmadapt("eacces", 5, "train", str(path))
    _one_clean_line(proc, 2, "Permission denied", f"lmadapt train --resume {out}")
    assert not _tmp_leftovers(out)
    _resumes_to_reference(setup, out)
