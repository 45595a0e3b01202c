import json

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.api import train
from lmadapt.config import build_run_config
from lmadapt.data.batching import length_grouped_batches
from lmadapt.hooks import Hook


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


@pytest.mark.parametrize("seed", range(5))
def test_the_longest_batch_comes_first(seed):
    # the memory peak at step 1, whatever the order: one longest example anywhere in the data
    lengths = [((i * 37) % 50) + 1 for i in range(203)]
    lengths[(seed * 41) % 203] = 99
    batches = length_grouped_batches(lengths, 8, seed=seed, bucket_batches=4)
    assert max(lengths[i] for i in batches[0]) == 99
    assert sorted(i for b in batches for i in b) == list(range(203))


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


def test_max_steps_with_grad_accum(run_config, tmp_path):
    m = train(
        build_run_config(run_config(train={"max_steps": 3, "grad_accum": 2, "eval_every": 3}))
    )
    assert m["steps"] == 3 and m["train_samples"] == 64
    assert m["epochs"] == 3 * 2 * 8 / 64  # each optimizer step consumed two batches of 8
    log = [json.loads(x) for x in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2, 3]  # log_every 2, and the last step


class _ClassifierGrads(Hook):
    """Records the classifier weight's .grad after every backward pass (accumulated so far)."""

    def __init__(self):
        self.grads = []

    def on_train_start(self, trainer):
        weight = dict(trainer.model.named_parameters())["classifier.weight"]
        weight.register_post_accumulate_grad_hook(lambda p: self.grads.append(p.grad.clone()))


def test_grad_accum_equals_one_k_times_larger_batch(run_config, tmp_path):
    """grad_accum=2 with batches of 8 trains the same weights as batches of 16.

    The shuffled order does not depend on the batch size (group_by_length off), so batches 2i and
    2i+1 of 8 are batch i of 16, and half the sum of two batch means of 8 is the mean over the 16;
    dropout 0 and fp32 make the passes deterministic. AdamW is blind to a constant scale of the
    gradient, so the accumulated gradients themselves are compared too.
    """

    def run(name, batch_size, grad_accum):
        grads = _ClassifierGrads()
        train_cfg = {
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "epochs": 1,
            "lr": 1e-3,
            "eval_every": None,
            "group_by_length": False,
            "dropout": 0.0,
        }
        cfg = run_config(method={"name": "full"}, train=train_cfg, output_dir=str(tmp_path / name))
        m = train(build_run_config(cfg), hooks=[grads])
        return m, load_file(str(tmp_path / name / "model/model.safetensors")), grads.grads

    accum, w_accum, g_accum = run("accum", 8, 2)
    big, w_big, g_big = run("big", 16, 1)
    small, w_small, _ = run("small", 8, 1)
    assert accum["steps"] == big["steps"] == 4 and small["steps"] == 8
    assert len(g_accum) == 8 and len(g_big) == 4
    for a, b in zip(g_accum[1::2], g_big):  # the gradient the optimizer steps on
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # measured: max |accum - big| 2e-8 on these gradients, 4e-7 on the trained weights, where
    # batches of 8 without accumulation end 6e-3 away
    assert set(w_accum) == set(w_big)
    for k in w_accum:
        torch.testing.assert_close(w_accum[k], w_big[k], rtol=1e-5, atol=1e-5)
    assert max(float((w_accum[k] - w_small[k]).abs().max()) for k in w_accum) > 1e-3


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


class _Groups(Hook):
    """The optimizer's (learning rate, parameter names) groups when training starts."""

    def on_train_start(self, trainer) -> None:
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        self.groups = [
            (g["lr"], sorted(names[id(p)] for p in g["params"]))
            for g in trainer.optimizer.param_groups
        ]


@pytest.mark.parametrize(
    ("head_lr", "expected"),
    [(None, 1e-4), (3e-3, 3e-3)],  # None: the run's rate (classification sets no floor)
)
def test_head_trains_at_its_own_rate(run_config, head_lr, expected):
    hook = _Groups()
    config = run_config(
        method={"name": "full", "lr": 1e-4}, train={"max_steps": 1, "head_lr": head_lr}
    )
    train(build_run_config(config), hooks=[hook])
    rate = {n: lr for lr, names in hook.groups for n in names}
    head = {n for n in rate if {"classifier", "pooler"} & set(n.split("."))}  # head_modules
    assert head and {rate[n] for n in head} == {expected}
    assert {lr for n, lr in rate.items() if n not in head} == {1e-4}
