"""LoRA's peft variants as settings of `method: lora` (DoRA, rsLoRA, gaussian/PiSSA/OLoRA init,
LoRA+): each trains, resumes exactly after a Ctrl-C, reloads onto the original base with the
trained model's logits, and merges into a plain model; what cannot work is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmadapt import cli
from lmadapt.api import load_run, resume, train
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.methods import METHODS, build_method
from lmadapt.schema import parse_section
from lmadapt.train.loop import TrainingInterrupted, build_optimizer
from tests.train.test_resume import SigintAt

TEXTS = ["the film was good", "the plot was awful", "a lovely cast and a dull ending"]
VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "pissa_dora_rslora": {"init": "pissa", "use_dora": True, "use_rslora": True},
    "loraplus": {"loraplus_ratio": 16.0},
}
MERGE_TOL = 1e-4
"""Merging folds B·A (and DoRA's norm) into W in fp32: rounding only, as in test_export."""


class Watch(Hook):
    """Keeps the trained model, the tensors it started from and the optimizer's rates."""

    def on_train_start(self, trainer):
        self.model = trainer.model
        self.rates = {g["lr"] for g in trainer.optimizer.param_groups}
        self.start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        self.trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def _config(run_config, tmp_path: Path, name: str, options: dict):
    return build_run_config(
        run_config(
            method={"name": "lora", "dropout": 0.0, **options},
            train={"max_steps": 4, "eval_every": 4, "checkpoint_every": 2, "lr": 1e-2},
            output_dir=str(tmp_path / name),
        )
    )


@torch.no_grad()
def _logits(model: torch.nn.Module, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tokenizer_dir)(TEXTS, padding=True, return_tensors="pt")
    return model.eval()(**batch).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_resumes_reloads_and_merges(variant, run_config, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    options = VARIANTS[variant]
    watch = Watch()
    reference = train(_config(run_config, tmp_path, "ref", options), hooks=[watch])
    run_dir = Path(reference["run_dir"])

    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    changed = {n for n, p in watch.model.named_parameters() if not torch.equal(p, watch.start[n])}
    assert changed <= watch.trainable, (
        f"frozen weights changed: {sorted(changed - watch.trainable)}"
    )
    assert any(".lora_B." in n for n in changed) and any(".lora_A." in n for n in changed)
    ratio = options.get("loraplus_ratio")
    assert (1e-2 * ratio in watch.rates) if ratio else (max(watch.rates) < 0.1)
    if options.get("use_dora"):
        assert any("lora_magnitude_vector" in n for n in changed)

    # the saved adapter, on the original base, gives the trained model's logits
    trained = _logits(watch.model, run_dir / "model")
    run = load_run(run_dir)
    torch.testing.assert_close(_logits(run.model, run_dir / "model"), trained, atol=1e-5, rtol=0)

    # a Ctrl-C after step 1 checkpoints step 2; the resumed run ends on the same weights
    with pytest.raises(TrainingInterrupted, match="interrupted at step 2"):
        train(_config(run_config, tmp_path, "cut", options), hooks=[SigintAt(1)])
    resumed = resume(tmp_path / "cut")
    assert resumed["resumed"] and resumed["dev"] == reference["dev"]
    a = load_file(run_dir / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "merged"
    assert cli.main(["export", str(run_dir), "--merge", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, out), trained, atol=MERGE_TOL, rtol=0)


def _lora(**options):
    return build_method(parse_section(METHODS, "name", {"name": "lora", **options}, "method"))


@pytest.fixture(scope="module")
def task_and_spec(tiny_bert):
    from lmadapt.models import resolve_model
    from lmadapt.tasks import TASKS, build_task

    task = build_task(
        parse_section(TASKS, "type", "classification", "task"), {"labels": ["a", "b"]}
    )
    return task, resolve_model(tiny_bert)


def test_settings_reach_peft(task_and_spec):
    """Each setting is peft's: DoRA's magnitudes, rsLoRA's alpha / sqrt(r), the init; the
    default is today's LoRA exactly (no variant, peft's default init, one learning rate)."""
    task, spec = task_and_spec
    default = _lora()
    peft_cfg = default.peft_config(task.build_model(spec), task, task.peft_task_type)
    assert (peft_cfg.use_dora, peft_cfg.use_rslora, peft_cfg.init_lora_weights) == (
        False,
        False,
        True,
    )
    assert default.lr_rules() == {}

    model = _lora(use_dora=True, use_rslora=True, r=4, alpha=8.0, init="gaussian").apply(
        task.build_model(spec), task
    )
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(8.0 / 2.0)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.peft_config["default"].init_lora_weights == "gaussian"


def test_pissa_adapter_is_saved_as_plain_lora_of_twice_the_rank(task_and_spec, tmp_path):
    """The saved PiSSA adapter holds [A; A0] and [B | -B0] at rank 2r, same scale, peft's
    default init (so loading it changes no base weight), and the head."""
    task, spec = task_and_spec
    method = _lora(init="pissa", r=4, alpha=8.0)
    model = method.apply(task.build_model(spec), task)
    method.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16.0, True)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    a = [v for k, v in saved.items() if ".lora_A." in k]
    assert a and all(v.shape[0] == 8 for v in a)
    assert any("classifier" in k for k in saved)
    # untrained: B·A - B0·A0 = 0, so the adapter on the original base is the original model
    original = task.build_model(spec)
    loaded = method.load(task, spec, tmp_path)
    batch = {"input_ids": torch.tensor([[101, 2204, 102]]), "attention_mask": torch.ones(1, 3)}
    query = "bert.encoder.layer.0.attention.self.query"
    residual = model.base_model.model.get_submodule(query).base_layer.weight
    assert not torch.allclose(residual, original.get_submodule(query).weight, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.base_model.model.bert(**batch).last_hidden_state,
            original.bert(**batch).last_hidden_state,
            atol=1e-5,
            rtol=0,
        )


def test_loraplus_rule_sets_the_b_rate_and_the_head_keeps_its_own(task_and_spec):
    task, spec = task_and_spec
    method = _lora(loraplus_ratio=16.0)
    model = method.apply(task.build_model(spec), task)
    heads = (task.head_modules(model), 3e-3)
    opt = build_optimizer(model, 1e-3, 0.01, "foreach", heads, method.lr_rules())
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "classifier" in name or "pooler" in name:
            expected = 3e-3
        elif ".lora_B." in name:
            expected = 1.6e-2
        else:
            expected = 1e-3
        assert rate[id(p)] == pytest.approx(expected), name
    # no rules: the groups (order, keys, rates) are those of the one-rate optimizer
    plain = build_optimizer(model, 1e-3, 0.01, "foreach", heads)
    empty = build_optimizer(model, 1e-3, 0.01, "foreach", heads, {})
    assert plain.state_dict()["param_groups"] == empty.state_dict()["param_groups"]
    assert len(opt.param_groups) == len(plain.param_groups) + 1


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"loraplus_ratio": 0}, "method.loraplus_ratio", "must be > 0"),
        ({"loraplus_ratio": -16}, "method.loraplus_ratio", "must be > 0"),
        ({"loraplus_ratio": float("nan")}, "method.loraplus_ratio", "must be > 0"),
        ({"init": "loftq"}, "method.init", "CUDA"),
        ({"init": "pissa_niter_4"}, "method.init", "must be one of"),
    ],
)
def test_bad_settings_are_refused_by_name(options, field, message):
    with pytest.raises(ConfigError, match=message) as e:
        _lora(**options)
    assert e.value.field == field


def test_the_pooler_copied_as_its_linear_layer_trains_as_the_pooler(
    run_config, tmp_path, monkeypatch
):
    """LoRA hands peft BERT's pooler as "pooler.dense" (so a server can mix adapters' copies in
    one batch): the same parameters train to the same values as with the pooler copied whole,
    and are saved under the same names."""
    from lmadapt.methods import lora

    linear = train(_config(run_config, tmp_path, "linear", {}))
    saved = json.loads((Path(linear["run_dir"]) / "model" / "adapter_config.json").read_text())
    assert "pooler.dense" in saved["modules_to_save"] and "pooler" not in saved["modules_to_save"]
    monkeypatch.setattr(lora, "linear_heads", lambda model, heads: heads)
    whole = train(_config(run_config, tmp_path, "whole", {}))
    assert linear["dev"]["loss"] == pytest.approx(whole["dev"]["loss"], abs=1e-6)
    a = load_file(Path(linear["run_dir"]) / "model" / "adapter_model.safetensors")
    b = load_file(Path(whole["run_dir"]) / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("pooler" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
