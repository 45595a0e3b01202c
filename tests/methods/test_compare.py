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


CHILD = """
import signal, sys, time
from pathlib import Path
done = Path(sys.argv[1])
def stop(*_):  # as lmadapt train does: finish the step, save, exit 130
    time.sleep(0.5)
    done.write_text("checkpoint saved")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("child_got_the_signal", [True, False])
def test_a_ctrl_c_lets_the_method_run_save_before_compare_stops(
    tmp_path, monkeypatch, child_got_the_signal
):
    """subprocess.run killed the child 0.25 s after a Ctrl-C, mid-save; now compare waits for it
    to stop by itself (a terminal signals both), or passes the signal on when it did not get it."""
    import importlib
    import signal
    import subprocess
    import sys
    import time

    compare = importlib.import_module("lmadapt.compare")  # the module, not the API function

    done, log = tmp_path / "done", tmp_path / "child.log"
    real_wait = subprocess.Popen.wait
    calls = []

    def wait(self, timeout=None):
        calls.append(timeout)
        if len(calls) == 1:  # the user's Ctrl-C arrives while compare waits for the child
            while "ready" not in log.read_text():
                time.sleep(0.05)
            if child_got_the_signal:
                self.send_signal(signal.SIGINT)
            raise KeyboardInterrupt
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    monkeypatch.setattr(compare, "CHILD_GRACE", 0.3 if not child_got_the_signal else 10.0)
    with pytest.raises(KeyboardInterrupt):
        compare._train_child([sys.executable, "-c", CHILD, str(done)], log)
    assert done.read_text() == "checkpoint saved"
