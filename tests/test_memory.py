"""The memory check: an estimate from the config alone (meta device, no weights read), printed
before the model loads, and a refusal naming what would fit when the run cannot."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import psutil
import pytest

import lmadapt.memory
from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.memory import GIB, Shape, estimate, model_shape, what_fits
from lmadapt.methods import METHODS, build_method
from lmadapt.models import resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.tasks.test_generation import gen_config
from tests.test_dependable import _train_cli

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def llama_7b(out: Path, tokenizer_from: str, dtype: str) -> str:
    """A Llama-7B-shaped model directory: config.json and a tokenizer, no weights at all (the
    check must refuse before any load, which would fail here)."""
    out.mkdir()
    for f in Path(tokenizer_from).iterdir():
        if f.name != "config.json" and f.suffix != ".safetensors":
            shutil.copy(f, out)
    (out / "config.json").write_text(json.dumps({**LLAMA_7B, "torch_dtype": dtype}))
    return str(out)


@pytest.fixture(scope="module")
def llama_7b_bf16(tmp_path_factory, tiny_llama) -> str:
    return llama_7b(tmp_path_factory.mktemp("7b") / "bf16", tiny_llama, "bfloat16")


@pytest.fixture(scope="module")
def llama_7b_fp32(tmp_path_factory, tiny_llama) -> str:
    return llama_7b(tmp_path_factory.mktemp("7b") / "fp32", tiny_llama, "float32")


def with_free(monkeypatch, gib: float) -> None:
    monkeypatch.setattr(lmadapt.memory, "free_bytes", lambda d: (int(gib * GIB), "the test RAM"))


def shape_of(model: str, method: str, task: str = "generation") -> Shape:
    t = build_task(parse_section(TASKS, "type", task, "task"), {"labels": ["a", "b"]})
    m = build_method(parse_section(METHODS, "name", method, "method"))
    return model_shape(resolve_model(model), t, m, trust_remote_code=False)


def test_the_7b_shape_is_read_from_the_config_alone(llama_7b_bf16):
    t0 = time.perf_counter()
    full = shape_of(llama_7b_bf16, "full")
    lora = shape_of(llama_7b_bf16, "lora")
    assert time.perf_counter() - t0 < 30  # nothing of 27 GB was allocated
    assert full.total == 6_738_415_616 == full.trainable  # Llama-2-7B's count
    assert lora.trainable == 4_194_304 and lora.frozen_bytes == 2 * full.total  # bf16 base
    assert (full.layers, full.hidden, full.heads, full.vocab) == (32, 4096, 32, 32000)


def test_a_bf16_base_halves_the_frozen_fp32_weights(llama_7b_fp32):
    t = build_task(parse_section(TASKS, "type", "generation", "task"))
    lora = build_method(parse_section(METHODS, "name", "lora", "method"))
    spec = resolve_model(llama_7b_fp32)
    fp32 = model_shape(spec, t, lora, trust_remote_code=False)
    bf16 = model_shape(spec, t, lora, trust_remote_code=False, base_dtype="bf16")
    assert fp32.frozen_bytes == 4 * (fp32.total - fp32.trainable)
    assert bf16.frozen_bytes == fp32.frozen_bytes // 2
    assert bf16.trainable == fp32.trainable


def test_a_preference_pair_is_two_rows_and_full_fine_tuning_holds_a_reference_copy(
    llama_7b_bf16,
):
    """DPO trains a pair as two rows; with LoRA its reference is the same model with adapters
    off (nothing more held), with full fine-tuning a frozen copy of every weight."""
    lora_gen, lora_pref = (
        shape_of(llama_7b_bf16, "lora"),
        shape_of(llama_7b_bf16, "lora", "preference"),
    )
    full_gen, full_pref = (
        shape_of(llama_7b_bf16, "full"),
        shape_of(llama_7b_bf16, "full", "preference"),
    )
    assert (lora_gen.rows_per_example, lora_pref.rows_per_example) == (1, 2)
    assert lora_pref.frozen_bytes == lora_gen.frozen_bytes
    assert full_pref.frozen_bytes == full_gen.frozen_bytes + 2 * full_gen.total  # bf16 copy
    one = estimate(lora_gen, 4, 512, checkpointing=False, eager_attention=False)
    pair = estimate(lora_pref, 4, 512, checkpointing=False, eager_attention=False)
    assert pair.activations == 2 * one.activations


def test_full_7b_is_refused_before_loading_and_lora_is_named(
    monkeypatch, tmp_path, llama_7b_bf16, capsys
):
    with_free(monkeypatch, 20)
    cfg = gen_config(tmp_path, llama_7b_bf16)
    cfg["method"] = {"name": "full"}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        train(build_run_config(cfg))
    assert time.perf_counter() - t0 < 60
    assert e.value.field == "model" and "will not fit" in e.value.message
    assert "method.name=lora" in e.value.message  # LoRA's bf16 base fits in 20 GiB
    assert "lmadapt: memory:" in capsys.readouterr().err  # printed before the (absent) weights
    assert not Path(cfg["output_dir"]).exists()


def test_full_7b_is_refused_on_this_machine_in_one_line(tmp_path, llama_7b_bf16, capsys):
    if psutil.virtual_memory().available > 120 * GIB:
        pytest.skip("this machine could hold a full 7B fine-tuning")
    cfg = gen_config(tmp_path, llama_7b_bf16)
    cfg["method"] = {"name": "full"}
    assert _train_cli(tmp_path, cfg, "device=cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmadapt: error: field 'model':") and "will not fit" in err[-1]
    assert "Traceback" not in "\n".join(err) and not Path(cfg["output_dir"]).exists()


def test_nothing_fits_says_so(monkeypatch, tmp_path, llama_7b_fp32):
    with_free(monkeypatch, 20)  # an fp32 7B base is 25 GiB by itself
    cfg = gen_config(tmp_path, llama_7b_fp32)
    with pytest.raises(ConfigError, match="weights alone take 25.1 GiB"):
        train(build_run_config(cfg))


def test_activations_suggest_a_smaller_batch_or_checkpointing():
    shape = Shape(0, 1000, 1000, layers=24, hidden=1024, heads=16, vocab=0)
    need = estimate(shape, 32, 512, checkpointing=False, eager_attention=False)
    ckpt = estimate(shape, 32, 512, checkpointing=True, eager_attention=False)
    assert ckpt.activations < need.activations / 4
    options = what_fits(need, None, int(need.total / 3), grad_accum=1, eager_attention=False)
    assert options == [
        "train.batch_size=8 with train.grad_accum=4",
        "train.gradient_checkpointing=true",
    ]


def test_a_tiny_model_passes_and_the_estimate_is_printed(run_config, capsys):
    assert train(build_run_config(run_config(train={"max_steps": 1})))["steps"] == 1
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lmadapt: memory:")]
    assert len(line) == 1 and "GiB free" in line[0]


def test_a_model_the_meta_build_cannot_make_is_trained_unchecked(monkeypatch, run_config, capsys):
    def fail(*a, **k):
        raise RuntimeError("custom code wants real tensors")

    monkeypatch.setattr(lmadapt.memory, "model_shape", fail)
    assert train(build_run_config(run_config(train={"max_steps": 1})))["steps"] == 1
    assert "lmadapt: memory: no estimate (RuntimeError" in capsys.readouterr().err


def test_a_run_reports_its_own_peak_not_its_parents():
    """Linux's ru_maxrss keeps the parent's RSS across fork and exec; a run started by a big
    process (pytest after the SmolLM2 tests, an `auto` or `hpo` driver) must report its own."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(2**28)  # 2 GiB held by this process, every page touched
    code = "from lmadapt.session import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 1024 < held.nbytes / 2**20  # MB: the child's imports only
