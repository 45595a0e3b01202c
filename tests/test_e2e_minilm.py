"""The main job on the real embedded MiniLM, shortened: the demo config, CLI, files written."""

from pathlib import Path

import pytest

from lmadapt.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_on_minilm(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "demo"
    code = main(
        [
            "train",
            "configs/demo.yaml",
            f"output_dir={out}",
            "train.max_steps=60",
            "train.eval_every=20",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "accuracy" in text
    assert (out / "model/adapter_model.safetensors").is_file()
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "minilm" and metrics["dev"]["accuracy"] > 0.6
    assert main(["predict", str(out), "The plot was wonderful."]) == 0
