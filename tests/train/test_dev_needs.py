"""What only a dev set can serve is refused without one, before anything is written
(issue #30: early stopping silently ignored; issue #29 item 15: task.calibrate trained, then
every predict failed); a run without dev says which weights it kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmadapt.api import read_run, train
from lmadapt.cli import main
from lmadapt.config import build_run_config, check_dev_needs
from lmadapt.errors import ConfigError


def _no_dev(run_config, **over) -> dict:
    cfg = run_config(**over)
    del cfg["data"]["dev"]
    return cfg


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"train": {"early_stopping": {"patience": 2}}}, "train.early_stopping.patience"),
        ({"task": {"type": "classification", "calibrate": True}}, "task.calibrate"),
    ],
)
def test_refused_without_dev_and_nothing_written(run_config, over, field):
    cfg = build_run_config(_no_dev(run_config, **over))
    with pytest.raises(ConfigError, match="needs data.dev") as e:
        train(cfg)
    assert e.value.field == field
    assert not Path(cfg.output_dir).exists()


def test_ner_calibrate_without_dev_is_refused(run_config):
    cfg = _no_dev(run_config, task={"type": "token_classification", "calibrate": True})
    with pytest.raises(ConfigError) as e:
        check_dev_needs(build_run_config(cfg))
    assert e.value.field == "task.calibrate"


def test_cli_exits_2_in_one_line(run_config, tmp_path, capsys):
    cfg = _no_dev(run_config, train={"early_stopping": {"patience": 1}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.early_stopping.patience" in err and len(err.splitlines()) == 1
    assert not Path(cfg["output_dir"]).exists()


def test_with_dev_both_are_accepted(run_config):
    check_dev_needs(
        build_run_config(
            run_config(
                task={"type": "classification", "calibrate": True},
                train={"early_stopping": {"patience": 2}},
            )
        )
    )


def test_a_run_without_dev_reports_its_last_weights_and_old_configs_still_load(
    run_config, sentiment_files
):
    cfg = build_run_config(
        _no_dev(run_config, data={"test": str(sentiment_files["dev"])}, train={"max_steps": 2})
    )
    train(cfg)
    out = Path(cfg.output_dir)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "step None" not in report
    assert "no dev set: the last step's weights" in report
    assert "Test set (last step)" in report and "best checkpoint)" not in report
    # A finished run made before the check (patience, no dev) still loads for predict.
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    saved["train"]["early_stopping"]["patience"] = 3
    (out / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert read_run(out).config.train.early_stopping.patience == 3
