"""Several processes: `torchrun --nproc_per_node 2` (gloo, CPU) trains exactly like one process.

The global batch of 7 splits into shards of 4 and 3, and each epoch ends on a 1-row batch that
leaves one process without rows: the runs only agree when every shard's loss is weighted by its
share of the global batch. fp32, no dropout; the weights agree to ATOL.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmadapt.api import resume, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.inference import OnDevice
from lmadapt.train.distributed import Distributed
from tests.conftest import sentiment_rows, write_csv

ATOL = 1e-5  # max |w_2proc - w_1proc| in fp32; measured about 1e-7

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.slow,  # torchrun starts real processes
]


def _torchrun(*args: str) -> None:
    """`lmadapt train ARGS` under torchrun with 2 processes; --standalone picks a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMADAPT_TENSORBOARD": "0"}
    proc = subprocess.run(
        [*cmd, "-m", "lmadapt", "train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _truncate(src: Path, dst: Path, keep_step: int) -> Path:
    """A copy of a finished run as if killed right after checkpoint `keep_step`."""
    shutil.copytree(src, dst)
    (dst / "metrics.json").unlink()
    for ckpt in (dst / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > keep_step:
            shutil.rmtree(ckpt)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> Path:
    """The same config trained by 1 process (in this one) and by 2 (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "full"},
        "data": {
            "train": str(write_csv(root / "train.csv", sentiment_rows(29, seed=1))),
            "dev": str(write_csv(root / "dev.csv", sentiment_rows(12, seed=2))),
        },
        "train": {
            "max_steps": 6,  # 2 epochs of 5 batches (7, 7, 7, 7, 1 rows) in steps of 2
            "batch_size": 7,
            "grad_accum": 2,
            "lr": 1e-3,
            "eval_every": 3,
            "checkpoint_every": 2,
            "keep_checkpoints": 3,
            "log_every": 1,
            "precision": "fp32",
            "dropout": 0.0,
            "threads": 1,
        },
    }
    train(build_run_config({**cfg, "output_dir": str(root / "one")}))
    config = root / "two.yaml"
    config.write_text(yaml.safe_dump({**cfg, "output_dir": str(root / "two")}))
    _torchrun(str(config))
    return root


def test_two_processes_update_like_one(runs):
    one, two = runs / "one", runs / "two"
    for step in (2, 4, 6):
        assert _max_diff(_weights(one, step), _weights(two, step)) < ATOL, step
    # one log, written once, with the global losses and the same dev evaluations
    log1, log2 = _log(one), _log(two)
    assert [(r["step"], sorted(r)) for r in log1] == [(r["step"], sorted(r)) for r in log2]
    for a, b in zip(log1, log2, strict=True):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        else:
            assert b["dev"] == pytest.approx(a["dev"], rel=1e-5)
    state1, state2 = (
        json.loads((run / "checkpoints/step-00000006/state.json").read_text())["trainer"]
        for run in (one, two)
    )
    for key in ("step", "epoch", "next_batch", "samples", "tokens", "best_step"):
        assert state1[key] == state2[key], key
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m1["best_step"] == m2["best_step"] and m1["epochs"] == m2["epochs"]
    assert "2 processes (ddp)" in (two / "report.md").read_text()
    assert not list(two.rglob("*.tmp"))


def test_two_process_checkpoint_resumes_in_one(runs):
    run = _truncate(runs / "two", runs / "two-then-one", keep_step=4)
    m = resume(run)
    assert m["resumed"] and m["processes"] == 1 and m["steps"] == 6
    assert _max_diff(_weights(run, 6), _weights(runs / "one", 6)) < ATOL


def test_one_process_checkpoint_resumes_in_two(runs):
    run = _truncate(runs / "one", runs / "one-then-two", keep_step=4)
    _torchrun("--resume", str(run))
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed"] and m["processes"] == 2 and m["steps"] == 6
    assert _max_diff(_weights(run, 6), _weights(runs / "one", 6)) < ATOL


def test_shards_are_disjoint_and_weighted():
    batch = [5, 3, 9, 0, 4, 8, 1]
    shards = [Distributed(rank=r, world_size=2).shard(batch) for r in (0, 1)]
    assert sorted(shards[0][0] + shards[1][0]) == sorted(batch)
    assert [share for _, share in shards] == [4 / 7, 3 / 7]
    # a process without rows still steps (gradient exchange) on one row that weighs nothing
    assert Distributed(rank=1, world_size=2).shard([6]) == ([6], 0.0)


def test_on_device_view_returns_cpu_logits(tiny_bert):
    """Evaluation on a GPU goes through this view; on the CPU it must change nothing."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    ids = torch.tensor([[101, 2023, 2001, 2204, 102]])
    view = OnDevice(model, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(view(input_ids=ids).logits, model(input_ids=ids).logits)
    assert view(input_ids=ids).logits.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP is allowed with CUDA")
def test_fsdp_without_cuda_is_a_config_error(run_config, tmp_path):
    with pytest.raises(ConfigError, match="fsdp") as err:
        train(build_run_config(run_config(train={"distributed": "fsdp"})))
    assert err.value.field == "train.distributed"
    assert not (tmp_path / "run").exists()
