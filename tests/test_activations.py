"""The activation trace (`lmadapt.activations`): what a step keeps for backward, counted on the
meta device, against the same count on a real step, and the estimate it feeds against a real
run's measured peak RSS."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmadapt.api import prepare
from lmadapt.config import build_run_config
from lmadapt.data.batching import largest_batch
from lmadapt.inference import autocast, model_inputs, use_bf16
from lmadapt.memory import Step, model_shape
from lmadapt.methods import build_method
from lmadapt.session import apply_method, set_attention
from lmadapt.train.loop import BatchPreparingTask
from tests.conftest import write_csv
from tests.tasks.test_generation import gen_config


def real_saved(model: torch.nn.Module, task, batch: dict, bf16: bool) -> int:
    """Bytes the real step keeps for backward: the loop's forward and loss under the same
    saved-tensor hooks, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(bf16, "cpu"):
            if isinstance(task, BatchPreparingTask):
                task.prepare_batch(model, batch)
            out = model(**model_inputs(batch), **task.forward_kwargs(model, batch))
        logits = task.logits(out)
        pack(logits)
        task.loss(logits, batch)
    return sum(seen.values())


CASES = {
    "classification-lora": lambda tmp, m: m["run_config"](),
    "classification-full": lambda tmp, m: m["run_config"](method={"name": "full"}),
    "classification-sdpa": lambda tmp, m: m["run_config"](attention="sdpa"),
    "generation-lora": lambda tmp, m: gen_config(tmp, m["tiny_llama"]),
    "generation-full": lambda tmp, m: {
        **gen_config(tmp, m["tiny_llama"]),
        "method": {"name": "full"},
    },
    "generation-eager": lambda tmp, m: {**gen_config(tmp, m["tiny_llama"]), "attention": "eager"},
}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_meta_trace_counts_what_the_real_step_keeps(
    case, bf16, tmp_path, run_config, tiny_llama
):
    if bf16 and not use_bf16("auto"):
        pytest.skip("this CPU has no bf16 units: autocast is off in real runs")
    cfg = build_run_config(
        CASES[case](tmp_path, {"run_config": run_config, "tiny_llama": tiny_llama})
    )
    data = prepare(cfg)
    task, spec = data.task, data.spec
    method = build_method(cfg.method)
    batch = largest_batch(
        data.features["train"], task.collator(data.tokenizer), cfg.train.batch_size
    )
    shape = model_shape(
        spec, task, method, False, step=Step(dict(batch), cfg.train, cfg.attention, bf16)
    )
    assert shape.saved is not None, "the trace failed: the formula stood in"

    torch.manual_seed(0)
    base = task.build_model(spec)
    set_attention(base, cfg.attention, spec.kind)
    model = apply_method(base, method, task, cfg.train)
    real = real_saved(model, task, dict(batch), bf16)
    traced = shape.saved.outside + shape.saved.blocks
    assert traced == pytest.approx(real, rel=0.1), (traced, real)


def test_checkpointing_keeps_the_block_inputs_and_one_block(tmp_path, run_config):
    cfg = build_run_config(run_config(train={"batch_size": 16}))
    data = prepare(cfg)
    batch = largest_batch(data.features["train"], data.task.collator(data.tokenizer), 16)
    saved = model_shape(
        data.spec, data.task, build_method(cfg.method), False,
        step=Step(batch, cfg.train, cfg.attention, False),
    ).saved  # fmt: skip
    assert saved is not None and saved.blocks > 0 and saved.largest_block <= saved.blocks
    assert saved.kept(16, True) < saved.kept(16, False)
    assert saved.kept(32, False) == pytest.approx(2 * saved.kept(16, False), rel=1e-6)


def words(n: int, rng: random.Random) -> str:
    return " ".join(
        rng.choice(["good", "bad", "movie", "plot", "actor", "scene"]) for _ in range(n)
    )


def activation_heavy(tmp_path: Path, tiny_bert: str) -> dict:
    """One step whose activations are most of its memory: tiny BERT, full fine-tuning, 1,024
    rows of 120 tokens, eager attention."""
    rng = random.Random(0)
    rows = [(words(120, rng), rng.choice(["pos", "neg"])) for _ in range(1024)]
    return {
        "model": tiny_bert,
        "task": {"type": "classification", "max_length": 128},
        "method": {"name": "full"},
        "data": {"train": str(write_csv(tmp_path / "train.csv", rows))},
        "train": {
            "epochs": 1,
            "max_steps": 1,
            "batch_size": 1024,
            "precision": "fp32",
            "threads": 1,
        },
        "output_dir": str(tmp_path / "run"),
    }


@pytest.mark.slow  # trains in a child process to measure its peak RSS
def test_the_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, tiny_bert):
    """The step alone in its process: the printed peak RSS against the process's own peak
    (`peak_rss_mb`: VmHWM, not ru_maxrss, which Linux carries over from the parent at fork and
    exec: after the SmolLM2 tests, pytest's own 3.9 GB showed up as the child's peak)."""
    cfg = activation_heavy(tmp_path, tiny_bert)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code = (
        "import json\n"
        "from lmadapt.cli import main\n"
        "from lmadapt.session import peak_rss_mb\n"
        f"rc = main(['train', {str(tmp_path / 'cfg.yaml')!r}])\n"
        "print(json.dumps({'rc': rc, 'peak': peak_rss_mb() * 2**20}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, p.stderr[-2000:]
    m = re.search(r"this run needs about ([\d.]+) GiB.*peak RSS about ([\d.]+) GiB", p.stderr)
    assert m, p.stderr[-2000:]
    run_gib, estimated = float(m.group(1)), float(m.group(2)) * 2**30
    assert run_gib > 0.4, "activations must dominate for the comparison to mean anything"
    assert estimated == pytest.approx(result["peak"], rel=0.2), (
        estimated / 2**30,
        result["peak"] / 2**30,
    )
    assert Path(cfg["output_dir"], "metrics.json").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_estimate_is_within_20_percent_of_the_gpu_peak(tmp_path, tiny_bert, monkeypatch):
    """On a GPU the estimate (no host retention there) against the allocator's peak."""
    import lmadapt.api
    from lmadapt.api import train
    from lmadapt.memory import check_fits

    estimates = []

    def kept(*args, **kwargs):
        estimates.append(check_fits(*args, **kwargs))
        return estimates[-1]

    monkeypatch.setattr(lmadapt.api, "check_fits", kept)
    torch.cuda.reset_peak_memory_stats()
    train(build_run_config({**activation_heavy(tmp_path, tiny_bert), "device": "cuda"}))
    peak = torch.cuda.max_memory_allocated()
    assert estimates[0] is not None and estimates[0].total > 0.4 * 2**30
    assert estimates[0].total == pytest.approx(peak, rel=0.2), (estimates[0].total, peak)
