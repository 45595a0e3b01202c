"""Each speed feature trains to the numbers of the plain path: fused vs foreach AdamW, bf16
autocast vs fp32, SDPA vs eager attention. (Packing: tests/tasks/test_generation.py; length
grouping: tests/train/test_loop.py; int8 frozen weights: tests/train/test_int8_base.py.)"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.train.loop import build_optimizer


def _run(run_config, out: Path, **over) -> tuple[dict, dict[str, torch.Tensor], list[float]]:
    metrics = train(build_run_config(run_config(output_dir=str(out), **over)))
    (saved,) = (out / "model").glob("*model.safetensors")  # an adapter, or the whole model
    weights = load_file(str(saved))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return metrics, weights, [r["loss"] for r in log if "loss" in r]


def _assert_same_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


def test_build_optimizer_picks_the_kernel():
    model = torch.nn.Linear(4, 2)
    assert build_optimizer(model, 1e-3, 0.0, "fused").defaults["fused"] is True
    foreach = build_optimizer(model, 1e-3, 0.0, "foreach").defaults
    assert foreach["foreach"] is True and not foreach["fused"]


def test_fused_and_foreach_adamw_train_the_same_weights(run_config, tmp_path):
    fused = _run(run_config, tmp_path / "fused", train={"optimizer": "fused"})
    foreach = _run(run_config, tmp_path / "foreach", train={"optimizer": "foreach"})
    _assert_same_weights(fused[1], foreach[1], 1e-5)
    assert fused[2] == pytest.approx(foreach[2], abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_autocast_tracks_fp32(run_config, tmp_path, method):
    m32, _, loss32 = _run(run_config, tmp_path / "fp32", method={"name": method})
    m16, _, loss16 = _run(
        run_config, tmp_path / "bf16", method={"name": method}, train={"precision": "bf16"}
    )
    assert m16["bf16"] and not m32["bf16"]
    assert loss16 != loss32  # autocast did run in bf16 ...
    # ... and bf16's rounding (~4e-5 here) stays far below what a wrong cast or lost gradient does
    assert loss16 == pytest.approx(loss32, abs=1e-3)
    assert m16["dev"]["loss"] == pytest.approx(m32["dev"]["loss"], abs=1e-3)


def test_sdpa_and_eager_attention_train_the_same_weights(run_config, tmp_path):
    sdpa = _run(run_config, tmp_path / "sdpa", attention="sdpa")
    eager = _run(run_config, tmp_path / "eager", attention="eager")
    _assert_same_weights(sdpa[1], eager[1], 1e-4)
    assert sdpa[0]["dev"]["loss"] == pytest.approx(eager[0]["dev"]["loss"], abs=1e-5)
