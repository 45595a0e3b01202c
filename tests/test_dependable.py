"""What a user does must never lose their work or silently keep the wrong model: overwrite
deletes only lmadapt's own directories, the checkpoint metric is checked and minimised when it is a
loss, bad paths and pickled weights are refused with one line and exit 2, the disk check writes
nothing, and a resumed run cleans what a crash left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmadapt.api import disk_needed, predict, resume, train
from lmadapt.cli import main
from lmadapt.config import TrainConfig, build_run_config
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.methods import METHODS, build_method
from lmadapt.models import resolve_model
from lmadapt.rundir import MARKER
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.train.loop import TrainingInterrupted, checkpoint_metric
from tests.train.test_resume import SigintAt


def _train_cli(tmp_path: Path, cfg: dict, *overrides: str) -> int:
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", str(path), *overrides])


# ------------------------------------------------------------------ 2. safe overwrite


def test_overwrite_never_deletes_a_directory_lmadapt_did_not_make(run_config, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code = _train_cli(tmp_path, run_config(output_dir=str(mine), overwrite=True))
    assert code == 2
    assert "field 'overwrite'" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_deletes_the_working_directory(run_config, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / MARKER).write_text("{}")  # even one that looks like a run
    (here / "notes.txt").write_text("keep")
    monkeypatch.chdir(here)
    with pytest.raises(ConfigError, match="working directory"):
        train(build_run_config(run_config(output_dir=".", overwrite=True)))
    assert (here / "notes.txt").is_file()


def test_overwrite_replaces_lmadapt_runs(run_config):
    cfg = run_config(train={"max_steps": 2}, overwrite=True)
    first = train(build_run_config(cfg))
    out = Path(first["run_dir"])
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("from the first run")
    train(build_run_config(cfg))
    assert not (out / "stale.txt").exists() and (out / "metrics.json").is_file()


# ------------------------------------------------------------------ 3-4. the checkpoint metric


def test_loss_as_checkpoint_metric_keeps_the_lowest_loss(run_config):
    cfg = run_config(train={"metric": "loss", "epochs": 3, "eval_every": 2})
    metrics = train(build_run_config(cfg))
    log = [json.loads(x) for x in (Path(metrics["run_dir"]) / "log.jsonl").read_text().splitlines()]
    dev = {r["step"]: r["dev"]["loss"] for r in log if "dev" in r}
    assert len(set(dev.values())) > 1
    assert metrics["best_step"] == min(dev, key=dev.get)


@pytest.mark.parametrize(
    "task, metric, mode",
    [
        ("classification", "loss", "min"),
        ("classification", "accuracy", "max"),
        ("token_classification", "loss", "min"),
        ("token_classification", "f1", "max"),
        ("generation", "perplexity", "min"),
        ("generation", "rougeL", "max"),
    ],
)
def test_metric_direction_comes_from_the_metric(task, metric, mode):
    t = build_task(parse_section(TASKS, "type", task, "task"))
    assert checkpoint_metric(TrainConfig(metric=metric), t) == (metric, mode)
    explicit = TrainConfig(metric=metric, metric_mode="max")
    assert checkpoint_metric(explicit, t)[1] == "max"


def test_misspelt_metric_fails_before_anything_is_written(run_config, tmp_path, capsys):
    cfg = run_config()
    assert _train_cli(tmp_path, cfg, "train.metric=acc") == 2
    err = capsys.readouterr().err
    assert "field 'train.metric'" in err and "accuracy" in err and "Traceback" not in err
    assert not Path(cfg["output_dir"]).exists()


# ------------------------------------------------------------------ 6-7. paths and pickles


def test_output_dir_under_a_file(run_config, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert _train_cli(tmp_path, run_config(output_dir=str(tmp_path / "afile" / "run"))) == 2
    assert "is a file" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_kept_even_with_overwrite(run_config, tmp_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("precious")
    assert _train_cli(tmp_path, run_config(output_dir=str(target), overwrite=True)) == 2
    assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "precious"


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import lmadapt.cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lmadapt.cli, "quiet_libraries", interrupted)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "lmadapt: interrupted"


def test_model_directory_with_only_pickled_weights_is_refused(tiny_bert, tmp_path):
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_bert, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(weights, model_dir / "pytorch_model.bin")
    with pytest.raises(LmadaptError, match="pickle.*save_file"):
        resolve_model(str(model_dir))


def test_run_with_a_pickled_adapter_is_refused(run_config):
    metrics = train(build_run_config(run_config(train={"max_steps": 2})))
    model_dir = Path(metrics["run_dir"]) / "model"
    weights = load_file(str(model_dir / "adapter_model.safetensors"))
    (model_dir / "adapter_model.safetensors").unlink()
    torch.save(weights, model_dir / "adapter_model.bin")
    with pytest.raises(LmadaptError, match="pickle") as e:
        predict(metrics["run_dir"], ["the film was good"])
    assert "weights_only=False" not in str(e.value)
    assert "adapter_model.safetensors" in str(e.value)


# ------------------------------------------------------------------ 8. the disk check


def test_disk_refusal_writes_nothing(run_config, monkeypatch):
    import lmadapt.api

    cfg = run_config(train={"max_steps": 2})
    real = shutil.disk_usage
    monkeypatch.setattr(lmadapt.api.shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    with pytest.raises(ConfigError, match="MB free"):
        train(build_run_config(cfg))
    assert not Path(cfg["output_dir"]).exists()
    monkeypatch.undo()
    assert train(build_run_config(cfg))["steps"] == 2  # no "already exists" on the re-run


def test_disk_estimate_fits_what_a_peft_run_writes(run_config, tiny_bert):
    cfg = run_config(train={"epochs": 1, "keep_checkpoints": 2})
    metrics = train(build_run_config(cfg))
    written = sum(p.stat().st_size for p in Path(metrics["run_dir"]).rglob("*.safetensors"))
    task = build_task(
        parse_section(TASKS, "type", "classification", "task"), {"labels": ["a", "b"]}
    )
    method = build_method(parse_section(METHODS, "name", "lora", "method"))
    model = method.apply(task.build_model(resolve_model(tiny_bert)), task)
    need = disk_needed(method, model, keep=2)
    assert written <= need <= 2 * written, (written, need)


# ------------------------------------------------------------------ 9. crash leftovers


def test_resume_removes_what_crashed_writes_left(run_config):
    cfg = run_config(train={"epochs": 2, "checkpoint_every": 3}, overwrite=True)
    with pytest.raises(TrainingInterrupted):
        train(build_run_config(cfg), hooks=[SigintAt(4)])
    out = Path(cfg["output_dir"])
    orphans = [
        out / ".model.k2j4.tmp",
        out / "checkpoints" / ".step-00000006.x81q.tmp",
        out / "checkpoints" / ".best.safetensors.ab12.tmp",
        out / ".log.jsonl.zz9.tmp",
    ]
    for p in orphans[:2]:
        p.mkdir(parents=True)
        (p / "trainable.safetensors").write_bytes(b"torn")
    for p in orphans[2:]:
        p.write_bytes(b"torn")
    resume(out)
    assert not [p for p in orphans if p.exists()]
