"""lmadapt hpo: search-space checks, a small study that resumes, pruning, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from lmadapt.cli import main
from lmadapt.config import load_config
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.hpo import STUDY_NAME, PruningHook, check_space, hpo, load_space
from lmadapt.rundir import MARKER
from lmadapt.train.loop import TrainState

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "method.r": {"type": "categorical", "choices": [2, 4]},
    "method.lr": {"type": "float", "low": "1e-3", "high": 1e-2, "log": True},
    "train.epochs": {"type": "int", "low": 1, "high": 2},
}


@pytest.fixture
def files(tmp_path, run_config, monkeypatch):
    """A tiny classification config (16 steps at most, dev every 4) and the space above."""
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(run_config()))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    return config, space


def _space_file(tmp_path: Path, space: object) -> Path:
    path = tmp_path / "bad_space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def _trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{study_dir / 'study.db'}"
    return optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials()


def test_space_file_parses(files):
    space = load_space(files[1])
    assert list(space) == list(SPACE)
    assert space["method.lr"].low == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert space["method.r"].edges() == [2, 4]
    assert space["train.epochs"].edges() == [1, 2]


@pytest.mark.parametrize(
    "space, field",
    [
        ({"method.r": {"type": "normal", "low": 1, "high": 2}}, "method.r.type"),
        ({"method.lr": {"type": "float", "low": 1e-4}}, "method.lr.high"),
        ({"method.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "method.lr.low"),
        ({"train.epochs": {"type": "int", "low": 3, "high": 1}}, "train.epochs.high"),
        ({"train.epochs": {"type": "int", "low": 1.5, "high": 3}}, "train.epochs.low"),
        ({"method.r": {"type": "categorical"}}, "method.r.choices"),
        ({"method.r": {"type": "categorical", "choices": [4], "low": 1}}, "method.r.low"),
        ({"method.r": {"type": "int", "lo": 1, "high": 2}}, "method.r.lo"),
        ({"method.r": [4, 8]}, "method.r"),
        ({"output_dir": {"type": "categorical", "choices": ["a"]}}, "output_dir"),
        ({}, "<root>"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, space, field):
    path = _space_file(tmp_path, space)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert e.value.field == field and e.value.source == str(path)


@pytest.mark.parametrize(
    "space, field, message",
    [
        ({"method.rank": {"type": "categorical", "choices": [4]}}, "method.rank", "unknown field"),
        ({"method.r": {"type": "int", "low": 0, "high": 4}}, "method.r", "must be >= 1"),
        ({"train.epochs": {"type": "float", "low": 0, "high": 2}}, "train.epochs", "> 0"),
    ],
)
def test_space_keys_and_bounds_checked_against_the_config(tmp_path, files, space, field, message):
    path = _space_file(tmp_path, space)
    with pytest.raises(ConfigError) as e:
        check_space(load_space(path), files[0], [], path)
    assert e.value.field == field and e.value.source == str(path)
    assert message in str(e.value) and str(files[0]) in str(e.value)


@pytest.mark.parametrize(
    "override, field", [("train.lr=1e-3", "method.lr"), ("train.max_steps=4", "train.epochs")]
)
def test_searching_a_key_the_config_overrules_is_an_error(files, override, field):
    with pytest.raises(ConfigError, match="has no effect") as e:
        check_space(load_space(files[1]), files[0], [override], files[1])
    assert e.value.field == field


def test_shipped_space_fits_its_config():
    space = ROOT / "configs/hpo/sst2_lora_space.yaml"
    command = space.read_text()
    assert "lmadapt hpo configs/sst2_lora.yaml --space configs/hpo/sst2_lora_space.yaml" in command
    overrides = ["data.max_train_samples=4000", "train.eval_every=50"]
    assert all(o in command for o in overrides)
    base = check_space(load_space(space), ROOT / "configs/sst2_lora.yaml", overrides, space)
    assert base.data.max_train_samples == 4000


def test_pruning_hook_reports_and_stops():
    reported = []
    trial = SimpleNamespace(
        report=lambda value, step: reported.append((value, step)), should_prune=lambda: False
    )
    trainer = SimpleNamespace(state=TrainState(step=4), metric="accuracy")
    hook = PruningHook(trial)
    hook.on_evaluate(trainer, {"accuracy": 0.5, "loss": 0.7})
    assert reported == [(0.5, 4)] and not trainer.state.should_stop
    trial.should_prune = lambda: True
    trainer.state.step = 8
    hook.on_evaluate(trainer, {"accuracy": 0.4, "loss": 0.8})
    assert trainer.state.should_stop and hook.pruned_at == 8


def test_study_runs_writes_best_config_and_resumes(files, tmp_path, capsys):
    config, space = files
    out = tmp_path / "study"
    overrides = ["data.max_train_samples=48"]
    result = hpo(config, space, 3, out, overrides)
    assert result["complete"] + result["pruned"] == 3 and result["best"] is not None
    best = load_config(out / "best.yaml")
    assert best.method.r in (2, 4) and 1e-3 <= best.method.lr <= 1e-2
    assert best.train.epochs in (1, 2) and best.data.max_train_samples == 48
    assert best.output_dir == str(out / "best")
    assert best.method.r == result["best"]["params"]["method.r"]
    report = (out / "report.md").read_text()
    for part in ("## Best vs base config", "## Trials", "## Parameter importances", "trials.png"):
        assert part in report
    assert (out / "trials.png").is_file() and (out / "evaluations.png").is_file()
    assert json.loads((out / MARKER).read_text()) == {"lmadapt": "hpo"}  # lmadapt's directory
    best_run = json.loads(
        (out / "trials" / str(result["best"]["number"]) / "metrics.json").read_text()
    )
    assert best_run["dev"]["accuracy"] == pytest.approx(result["best"]["value"])

    # the same command with a larger budget runs only the missing trial; overrides may follow
    # the options on the command line
    args = ["hpo", str(config), "--space", str(space), "--study-dir", str(out)]
    assert main([*args, "--trials", "4", *overrides]) == 0
    assert "# Hyperparameter search" in capsys.readouterr().out
    assert [t.number for t in _trials(out)] == [0, 1, 2, 3]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2", "3"]

    # a different base config is a different study
    assert main([*args, "--trials", "5"]) == 2
    assert "started with another config" in capsys.readouterr().err
    assert len(_trials(out)) == 4


def test_pruned_trial_stops_at_its_first_evaluation(files, tmp_path):
    config, space = files
    out = tmp_path / "study"
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # accuracy is never >= 2
    with pytest.raises(LmadaptError, match="no trial completed"):
        hpo(config, space, 1, out, pruner=always)
    (trial,) = _trials(out)
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [4]
    run = json.loads((out / "trials" / "0" / "metrics.json").read_text())
    assert run["steps"] == 4 and run["stopped_early"]
    assert "| 0 | pruned |" in (out / "report.md").read_text()
    assert not (out / "best.yaml").exists()


def test_cli_bad_space_exits_2_before_writing(files, tmp_path, capsys):
    config, _ = files
    bad = _space_file(tmp_path, {"method.r": {"type": "int", "low": 4}})
    assert main(["hpo", str(config), "--space", str(bad), "--trials", "2"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "method.r.high" in err and "is required" in err
    assert not (tmp_path / "run_hpo").exists()


def test_a_study_dir_holding_only_its_marker_is_reused(files, tmp_path):
    """A new study marks its directory first; an interrupt before study.db exists leaves only
    the marker, and the same command must then start the study, not refuse the directory."""
    config, space = files
    out = tmp_path / "study"
    out.mkdir()
    (out / MARKER).write_text('{"lmadapt": "hpo"}')
    result = hpo(config, space, 1, out, ["data.max_train_samples=48"])
    assert result["complete"] + result["pruned"] == 1
