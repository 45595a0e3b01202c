"""The `device` setting: resolved in one place (session.resolve_device), refused in one line and
before anything is written when the machine lacks it, and used by the single-process run and the
inference commands (`--device`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmadapt.api import load_run, predict, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.inference import on_model_device
from lmadapt.session import resolve_device
from lmadapt.train import distributed
from tests.test_dependable import _train_cli


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without a GPU, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_the_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cpu_is_always_there():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("choice", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_naming_the_field(no_cuda, choice):
    with pytest.raises(ConfigError) as e:
        resolve_device(choice)
    assert e.value.field == "device"
    assert "CUDA is not available" in e.value.message and "device: cpu" in e.value.message
    assert "\n" not in str(e.value)


def test_a_gpu_index_past_the_last_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


def test_mps_without_apple_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS"):
        resolve_device("mps")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "0", "tpu"])
def test_bad_device_strings_are_refused_by_the_config(run_config, bad):
    with pytest.raises(ConfigError) as e:
        build_run_config(run_config(device=bad))
    assert e.value.field == "device"


@pytest.mark.parametrize("good", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_device_strings_load(run_config, good):
    assert build_run_config(run_config(device=good)).device == good


def test_single_process_takes_the_resolved_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("ddp", torch.device("cpu")) is distributed.SINGLE
    meta = distributed.setup("ddp", torch.device("meta"))
    assert meta.device == torch.device("meta") and not meta.enabled and meta.strategy == "none"


def test_train_on_cuda_without_a_gpu_is_one_line_and_writes_nothing(
    no_cuda, run_config, tmp_path, capsys
):
    cfg = run_config()
    assert _train_cli(tmp_path, cfg, "device=cuda") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'device'" in err and "CUDA is not available" in err
    assert not Path(cfg["output_dir"]).exists()


def test_train_with_device_cpu_trains(run_config):
    metrics = train(build_run_config(run_config(device="cpu", train={"max_steps": 2})))
    assert metrics["steps"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_single_process_trains_on_the_gpu(run_config):
    cfg = build_run_config(run_config(device="cuda", train={"max_steps": 2}))
    metrics = train(cfg)
    assert metrics["steps"] == 2 and Path(metrics["run_dir"], "model").is_dir()


# ---------------------------------------------------------------------- inference commands

TEXTS = ["the film was good", "the plot was bad", "fine"]


@pytest.fixture
def finished_run(run_config) -> str:
    return train(build_run_config(run_config(train={"max_steps": 2})))["run_dir"]


def _predict_cli(capsys, run: str, *flags: str) -> list[str]:
    assert main(["predict", run, *TEXTS, *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_predict_with_device_cpu_or_auto_is_todays_prediction(finished_run, capsys):
    today = _predict_cli(capsys, finished_run)
    assert len(today) == len(TEXTS)
    assert _predict_cli(capsys, finished_run, "--device", "cpu") == today
    assert _predict_cli(capsys, finished_run, "--device", "auto") == today


def test_predict_on_cuda_without_a_gpu_is_one_line_before_loading(
    no_cuda, finished_run, capsys, monkeypatch
):
    from lmadapt import api

    loaded: list = []
    monkeypatch.setattr(api, "read_run", lambda d: loaded.append(d))
    assert main(["predict", finished_run, "x", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "Traceback" not in err
    assert not loaded


def test_a_misspelt_device_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "run", "x", "--device", "gpu"])
    assert e.value.code == 2 and "--device" in capsys.readouterr().err


def test_a_cpu_model_is_called_as_it_is():
    model = torch.nn.Linear(2, 2)
    assert on_model_device(model) is model


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictions_on_the_gpu_match_the_cpu(finished_run):
    on_cpu = predict(load_run(finished_run, "cpu"), TEXTS)
    gpu_run = load_run(finished_run, "cuda")
    assert next(gpu_run.model.parameters()).device.type == "cuda"
    on_gpu = predict(gpu_run, TEXTS)
    for cpu_row, gpu_row in zip(on_cpu, on_gpu):
        assert gpu_row["label"] == cpu_row["label"]
        for label, p in cpu_row["probabilities"].items():
            assert abs(gpu_row["probabilities"][label] - p) <= 1e-4
