"""`lmadapt export RUN --merge OUT`: a plain transformers model that matches the adapted one."""

from __future__ import annotations

import json

import pytest
import torch

from lmadapt import cli, export
from lmadapt.api import load_run, train
from lmadapt.config import build_run_config
from lmadapt.errors import LmadaptError

TEXTS = ["the film was good", "the plot was awful", "a lovely cast and a dull ending"]


def _train(run_config, method: str, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("LMADAPT_TENSORBOARD", "0")
    cfg = run_config(
        method=method,
        output_dir=str(tmp_path / method),
        train={"max_steps": 6, "eval_every": 6, "lr": 1e-2},
    )
    return train(build_run_config(cfg))["run_dir"]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_merged_export_matches_the_adapter(method, run_config, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = _train(run_config, method, tmp_path, monkeypatch)
    out = tmp_path / "merged"
    assert cli.main(["export", run_dir, "--merge", str(out)]) == 0
    info = json.loads((out / "lmadapt_export.json").read_text())
    assert info["method"] == method and info["max_abs_diff"] <= 1e-4

    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    run = load_run(run_dir)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**batch).logits, run.model(**batch).logits, atol=1e-4, rtol=0
        )


def test_export_over_tolerance_fails_and_writes_nothing(run_config, tmp_path, monkeypatch, capsys):
    run_dir = _train(run_config, "lora", tmp_path, monkeypatch)
    monkeypatch.setattr(export, "max_abs_diff", lambda a, b: 0.5)
    out = tmp_path / "merged"
    assert cli.main(["export", run_dir, "--merge", str(out)]) == 2
    assert "differ" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_export_refuses_methods_that_cannot_merge(run_config, tmp_path, monkeypatch):
    run_dir = _train(run_config, "bitfit", tmp_path, monkeypatch)
    with pytest.raises(LmadaptError, match="cannot be merged"):
        export.export_merged(run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_export_replaces_only_its_own_output(run_config, tmp_path, monkeypatch, capsys):
    """--overwrite replaces an earlier export (marked as lmadapt's), never a user's directory."""
    run_dir = _train(run_config, "lora", tmp_path, monkeypatch)
    out, mine = tmp_path / "merged", tmp_path / "mine"
    assert cli.main(["export", run_dir, "--merge", str(out)]) == 0
    assert cli.main(["export", run_dir, "--merge", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["export", run_dir, "--merge", str(out), "--overwrite"]) == 0
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert cli.main(["export", run_dir, "--merge", str(mine), "--overwrite"]) == 2
    assert "field '--overwrite'" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
