"""The `device` setting: resolved in one place (session.resolve_device), refused in one line and
before anything is written when the machine lacks it, and used by the single-process run and the
inference commands (`--device`)."""

from __future__ import annotations

import importlib
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


# ---------------------------------------------------------------- the other commands


def test_prompt_on_cuda_without_a_gpu_is_refused_before_loading(no_cuda, tmp_path, monkeypatch):
    from lmadapt.prompting import sources
    from lmadapt.prompting.runner import run_prompt

    model_loading = importlib.import_module("lmadapt.models")  # `lmadapt.models` is the API's
    from tests.prompting.conftest import prompt_config

    sources.load_lm.cache_clear()
    loaded = []
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: loaded.append(a))
    csv = tmp_path / "dev.csv"
    csv.write_text("text,label\ngood,1\nbad,0\n")
    cfg = prompt_config("unused-model", {"dev": csv, "train": csv}, tmp_path, device="cuda")
    with pytest.raises(ConfigError, match="CUDA is not available") as e:
        run_prompt(cfg)
    assert e.value.field == "device" and not loaded
    assert not (tmp_path / "out").exists()


def test_prompt_device_spelling_is_checked_on_load(tmp_path):
    from lmadapt.prompting.config import load_prompt_config

    with pytest.raises(ConfigError, match="field 'device'"):
        load_prompt_config({"data": {"dev": "x.csv"}, "device": "gpu"})


def test_prompt_runs_where_its_device_says(tiny_llama, tmp_path):
    from lmadapt.prompting.runner import run_prompt
    from lmadapt.prompting.sources import load_lm
    from tests.prompting.conftest import prompt_config

    files = {"dev": tmp_path / "dev.csv", "train": tmp_path / "train.csv"}
    rows = "text,label\n" + "a great film,1\na dull film,0\n" * 3
    for f in files.values():
        f.write_text(rows)
    run_prompt(prompt_config(tiny_llama, files, tmp_path, device="cpu", seeds=[0]))
    model, _ = load_lm(tiny_llama, "cpu")
    assert next(model.parameters()).device == torch.device("cpu")


def test_distill_on_cuda_without_a_gpu_is_refused_and_writes_nothing(
    no_cuda, tmp_path, tiny_bert, sentiment_files
):
    from lmadapt.distill.runner import build_distill_config, run_distill

    cfg = build_distill_config(
        {
            "teacher": {"type": "run", "run_dir": str(tmp_path / "no-teacher")},
            "model": tiny_bert,
            "task": {"type": "classification"},
            "data": {"train": str(sentiment_files["train"]), "dev": str(sentiment_files["dev"])},
            "device": "cuda",
            "output_dir": str(tmp_path / "student"),
        }
    )
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run_distill(cfg)  # before the teacher loads (its run dir does not even exist)
    assert not (tmp_path / "student").exists()


def test_continual_is_cpu_only_and_says_so():
    from lmadapt.continual.config import build_continual_config

    entry = {"name": "a", "task": {"type": "classification"}, "data": {"train": "t", "dev": "d"}}
    assert build_continual_config({"stream": [entry]}).device == "auto"
    with pytest.raises(ConfigError, match="field 'device'"):
        build_continual_config({"device": "cuda", "stream": [entry]})


# ---------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("method", ["full", "bitfit", "prompt_tuning", "adapter"])
def test_quantize_is_refused_for_methods_that_train_the_base(run_config, method):
    cfg = build_run_config(run_config(quantize="nf4", method={"name": method}))
    with pytest.raises(ConfigError, match="lora, adalora or ia3") as e:
        train(cfg)
    assert e.value.field == "quantize"
    assert not Path(cfg.output_dir).exists()


@pytest.mark.parametrize("choice", ["nf4", "int8"])
def test_quantize_trains_without_a_gpu(no_cuda, run_config, tmp_path, choice):
    """bitsandbytes' CPU backend: QLoRA is no longer refused where no GPU is visible
    (tests/methods/test_quantize.py checks what such a run does)."""
    cfg = run_config(method={"name": "lora"}, train={"max_steps": 2})
    assert _train_cli(tmp_path, cfg, f"quantize={choice}") == 0
    assert (Path(cfg["output_dir"]) / "model" / "adapter_model.safetensors").exists()


def test_quantize_without_bitsandbytes_is_refused(monkeypatch, run_config):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="bitsandbytes, which is not installed"):
        train(build_run_config(run_config(quantize="int8", method={"name": "ia3"})))


def test_quantize_spelling_is_checked(run_config):
    with pytest.raises(ConfigError, match="field 'quantize'"):
        build_run_config(run_config(quantize="fp4"))
