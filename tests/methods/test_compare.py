"""`lmadapt compare`: one subprocess run per method, one table."""

from __future__ import annotations

import json

import pytest
import yaml

from lmadapt import cli


@pytest.mark.slow
def test_compare_two_methods(run_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")  # inherited by the runs: faster start
    cfg = run_config(
        output_dir=str(tmp_path / "cmp"), train={"max_steps": 4, "eval_every": 2, "lr": 1e-2}
    )
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # options before CONFIG: argparse takes no positional overrides after an option
    assert (
        cli.main(["compare", "--methods", "lora,prompt_tuning", str(path), "train.log_every=1"])
        == 0
    )
    out = tmp_path / "cmp"
    result = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["lora", "prompt_tuning"]
    assert result["metric"] == "accuracy"
    for row in result["rows"]:
        assert row["ok"] and 0 <= row["dev_metric"] <= 1
        assert 0 < row["trainable_params"] < row["total_params"]
        assert row["model_bytes"] > 0 and row["peak_rss_mb"] > 0 and row["wall_seconds"] > 0
        assert (out / row["method"] / "model").is_dir()
        assert (
            yaml.safe_load((out / row["method"] / "config.yaml").read_text())["method"]["name"]
            == row["method"]
        )
    table = (out / "compare.md").read_text()
    assert "| lora |" in table and "| prompt_tuning |" in table
    assert (out / "compare.png").stat().st_size > 0
    assert "prompt_tuning" in capsys.readouterr().out


def test_compare_checks_every_method_before_running(run_config, tmp_path, capsys):
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(run_config(output_dir=str(tmp_path / "cmp"))))
    assert cli.main(["compare", str(path), "--methods", "lora,nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_refuses_a_setting_that_needs_dev_before_running(run_config, tmp_path, capsys):
    cfg = run_config(output_dir=str(tmp_path / "cmp"), task={"calibrate": True})
    cfg["data"].pop("dev")
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path), "--methods", "lora,bitfit"]) == 2
    assert "task.calibrate" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
