import json

import pytest
from safetensors.torch import load_file

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.data.batching import length_grouped_batches


def test_length_grouped_batches_cover_every_index_once():
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    batches = length_grouped_batches(lengths, 8, seed=3, bucket_batches=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert batches == length_grouped_batches(lengths, 8, seed=3, bucket_batches=4)
    assert batches != length_grouped_batches(lengths, 8, seed=4, bucket_batches=4)
    # inside a batch lengths are close: padding far below the ungrouped case
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.25 * sum(lengths)


def test_same_seed_same_result(run_config, tmp_path):
    a = train(build_run_config(run_config(output_dir=str(tmp_path / "a"))))
    b = train(build_run_config(run_config(output_dir=str(tmp_path / "b"))))
    assert a["dev"] == b["dev"]
    wa = load_file(str(tmp_path / "a/model/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b/model/adapter_model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_early_stopping_and_best_checkpoint(run_config, tmp_path):
    # lr 0 never improves after the first eval, so patience 2 stops after the third
    cfg = run_config(
        train={
            "lr": 1e-12,
            "epochs": 20,
            "eval_every": 2,
            "log_every": 1,
            "early_stopping": {"patience": 2},
            "precision": "fp32",
        }
    )
    m = train(build_run_config(cfg))
    assert m["stopped_early"] and m["steps"] == 6 and m["best_step"] == 2
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "dev" in r] == [2, 4, 6]
    assert (tmp_path / "run/tb").is_dir() and any((tmp_path / "run/tb").iterdir())


def test_max_steps_and_grad_accum(run_config):
    m = train(
        build_run_config(run_config(train={"max_steps": 3, "grad_accum": 2, "eval_every": 3}))
    )
    assert m["steps"] == 3 and m["train_samples"] == 64
    assert m["samples_per_second"] > 0


def test_loss_goes_down(run_config, tmp_path):
    cfg = run_config(method={"name": "full"}, train={"epochs": 10, "lr": 3e-3, "log_every": 8})
    train(build_run_config(cfg))
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "run/log.jsonl").read_text().splitlines()
        if '"loss"' in x and '"dev"' not in x
    ]
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize("method", ["full", "bitfit", "lora"])
def test_run_directory_contents(method, run_config, tmp_path):
    m = train(build_run_config(run_config(method={"name": method})))
    run = tmp_path / "run"
    for name in [
        "config.yaml",
        "run.json",
        "metrics.json",
        "report.md",
        "log.jsonl",
        "plots/loss.png",
        "plots/metrics.png",
        "plots/dev_confusion_matrix.png",
    ]:
        assert (run / name).is_file(), name
    model_files = {p.name for p in (run / "model").iterdir()}
    expected = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert expected in model_files and not any(f.endswith((".bin", ".pt")) for f in model_files)
    report = (run / "report.md").read_text()
    assert "Confusion matrix" in report and f"{m['trainable_params']:,}" in report
    assert not list(run.rglob("*.tmp"))
