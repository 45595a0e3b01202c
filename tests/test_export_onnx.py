"""`lmadapt export RUN --format onnx [--quantize int8]`: a directory ONNX Runtime runs, giving
the run's own logits (fp32) or what int8 costs against them (on the dev set), else nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadapt import export_onnx
from lmadapt.api import input_examples, load_run, predict
from lmadapt.cli import main
from lmadapt.export_onnx import ONNX_TOLERANCE, OnnxModel
from lmadapt.inference import Encoded
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.onnx_runs import TEXTS, cls_config, train_run


def _predicts(row: dict) -> object:
    """What a prediction row predicts (its scores left aside)."""
    return row.get("label", row.get("tags", row.get("answer")))


def _onnx_predict(out: Path, texts: list[str]) -> list[dict]:
    """Predictions from the export directory alone: its task files, its tokenizer, a fresh
    ONNX Runtime session on its model.onnx, decoded by the task."""
    from transformers import AutoTokenizer

    saved = json.loads((out / "lmadapt_task.json").read_text())
    task = build_task(parse_section(TASKS, "type", saved["task"], "task"), saved["state"])
    tok = AutoTokenizer.from_pretrained(out)
    examples = input_examples(task, texts, None, "auto", "predict")
    data = Encoded(task.encode(examples, tok), examples, task.collator(tok), 8)
    return task.predict_model(OnnxModel(out / "model.onnx"), data)


@pytest.mark.parametrize("kind", list(TEXTS))
def test_fp32_export_gives_the_runs_logits_and_predictions(kind, onnx_runs, onnx_fp32):
    import onnxruntime

    result, out = onnx_fp32[kind]
    info = json.loads((out / "lmadapt_export.json").read_text())
    print(f"{kind}: ONNX Runtime vs PyTorch max abs logit diff {info['max_abs_diff']:.2e}")
    assert info["max_abs_diff"] <= ONNX_TOLERANCE == info["tolerance"]
    assert info["quantize"] is None and not (out / "report.md").exists()
    assert result == {"out_dir": str(out), **info} and (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".fp32") for p in out.iterdir())
    qa = kind == "question_answering"
    assert info["outputs"] == (["start_logits", "end_logits"] if qa else ["logits"])
    # QA features never carry segments (the run trained on segment 0): nor does the graph
    assert info["inputs"] == ["input_ids", "attention_mask"] + ([] if qa else ["token_type_ids"])

    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == info["inputs"]
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())
    onnx_rows = _onnx_predict(out, TEXTS[kind])
    assert [_predicts(r) for r in onnx_rows] == [
        _predicts(r) for r in predict(onnx_runs[kind], TEXTS[kind])
    ]


def test_onnx_runtime_alone_reproduces_the_classifier(onnx_runs, onnx_fp32):
    """No lmadapt at inference: the saved tokenizer, a session, the saved labels."""
    import onnxruntime
    from transformers import AutoTokenizer

    out = onnx_fp32["classification"][1]
    tok = AutoTokenizer.from_pretrained(out)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    enc = tok(TEXTS["classification"], padding=True, return_tensors="np")
    (logits,) = session.run(["logits"], {i.name: enc[i.name] for i in session.get_inputs()})
    run = load_run(onnx_runs["classification"], "cpu")
    with torch.no_grad():
        expected = run.model(**tok(TEXTS["classification"], padding=True, return_tensors="pt"))
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=ONNX_TOLERANCE, rtol=0)
    labels = json.loads((out / "lmadapt_task.json").read_text())["labels"]
    assert [labels[i] for i in logits.argmax(-1)] == [
        r["label"] for r in predict(onnx_runs["classification"], TEXTS["classification"])
    ]


def test_int8_is_scored_on_the_dev_set_against_fp32(onnx_runs, tmp_path):
    out = tmp_path / "int8"
    result = export_onnx.export_onnx(
        onnx_runs["classification"], out, quantize="int8", max_metric_drop=100
    )
    q = result["int8"]
    assert q["int8_bytes"] < q["fp32_bytes"]
    dev = q["dev"]
    assert dev["metric"] == "accuracy" and dev["examples"] == 24
    assert dev["agreement"]["compared"] == 24 and 0 <= dev["agreement"]["rate"] <= 1
    worst = min(dev["int8"], dev["int8_one_at_a_time"])
    assert dev["drop_points"] == pytest.approx(100 * (dev["fp32"] - worst))
    assert dev["batched_vs_one_at_a_time"]["compared"] == 24
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "agrees with fp32" in report
    assert "one input at a time" in report
    assert json.loads((out / "lmadapt_export.json").read_text())["int8"] == q
    assert (out / "model.onnx").stat().st_size == q["int8_bytes"]
    assert not (out / ".fp32").exists()
    assert [_predicts(r) for r in _onnx_predict(out, TEXTS["classification"])]  # it runs


def test_int8_without_a_dev_set_says_so(onnx_runs, tmp_path):
    out = tmp_path / "int8"
    q = export_onnx.export_onnx(onnx_runs["token_classification"], out, quantize="int8")["int8"]
    assert q["dev"] is None and "no dev set" in q["note"]
    assert q["probe_agreement"]["compared"] > len(export_onnx.PROBE_TEXTS)  # one per word
    assert "no dev set" in (out / "report.md").read_text()


def test_int8_losing_more_than_allowed_is_refused(onnx_runs, tmp_path, monkeypatch, capsys):
    """A dev metric dropping past --max-metric-drop writes nothing (here 50 points, faked)."""
    real = export_onnx._score

    def worse(task, model, data):
        ev, rows = real(task, model, data)
        if model.path.parent.name != ".fp32":  # the int8 model
            ev.metrics[task.default_metric] -= 0.5
        return ev, rows

    monkeypatch.setattr(export_onnx, "_score", worse)
    out = tmp_path / "int8"
    args = ["export", onnx_runs["classification"], "--format", "onnx", "--quantize", "int8"]
    assert main([*args, "--out", str(out), "--max-metric-drop", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--max-metric-drop 1.5" in err and "nothing was written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_methods_that_cannot_merge_are_refused_before_loading(tmp_path, tiny_bert, capsys):
    run = train_run(tmp_path, cls_config(tmp_path, tiny_bert, "prompt_tuning", max_steps=2))
    out = tmp_path / "onnx"
    assert main(["export", run, "--format", "onnx", "--out", str(out)]) == 2
    assert "method 'prompt_tuning' cannot be exported to ONNX" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))


def test_the_command_and_its_output_directory(onnx_runs, onnx_fp32, tmp_path, capsys):
    """The CLI path, over an earlier export (replaced only with --overwrite) and over a
    directory of the user's (never replaced)."""
    run, mine = onnx_runs["classification"], tmp_path / "mine"
    out = Path(shutil.copytree(onnx_fp32["classification"][1], tmp_path / "export"))  # shared
    assert main(["export", run, "--format", "onnx", "--out", str(out)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["export", run, "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert f"ONNX model (fp32) written to {out}" in said and "tolerance 0.0001" in said
    assert json.loads((out / "lmadapt_export.json").read_text())["max_abs_diff"] <= 1e-4
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["export", run, "--format", "onnx", "--out", str(mine), "--overwrite"]) == 2
    assert "field '--overwrite'" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
    # options of one format are refused by another, a format must exist
    assert main(["export", run, "--out", str(tmp_path / "m"), "--quantize", "int8"]) == 2
    assert "field '--quantize': does not apply to --format safetensors" in (capsys.readouterr().err)
    assert main(["export", run, "--format", "tflite", "--out", str(tmp_path / "t")]) == 2
    assert "safetensors, onnx, gguf" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_minilm_exports_within_tolerance_and_int8_is_scored(tmp_path, capsys):
    """The real embedded encoder: fp32 within ONNX_TOLERANCE, int8 scored on a 200-example dev
    set (the figures the README quotes)."""
    cfg = cls_config(tmp_path, "minilm", dev_rows=200, max_steps=16, eval_every=16, lr=5e-4)
    run = train_run(tmp_path, {**cfg, "train": {**cfg["train"], "threads": 2}})
    assert main(["export", run, "--format", "onnx", "--out", str(tmp_path / "fp32")]) == 0
    fp32 = json.loads((tmp_path / "fp32" / "lmadapt_export.json").read_text())
    assert fp32["max_abs_diff"] <= ONNX_TOLERANCE
    out = tmp_path / "int8"
    args = ["export", run, "--format", "onnx", "--quantize", "int8", "--out", str(out)]
    assert main([*args, "--max-metric-drop", "100"]) == 0
    q = json.loads((out / "lmadapt_export.json").read_text())["int8"]
    assert q["int8_bytes"] < q["fp32_bytes"] / 3  # the encoder's matrices are int8 now
    assert q["dev"]["agreement"]["rate"] > 0.9
    with capsys.disabled():
        print(
            f"\nminilm: fp32 max abs diff {fp32['max_abs_diff']:.2e}; int8 dev accuracy "
            f"{q['dev']['fp32']:.4f} -> {q['dev']['int8']:.4f}, agreement "
            f"{q['dev']['agreement']}, {q['fp32_bytes'] / 2**20:.1f} MB -> "
            f"{q['int8_bytes'] / 2**20:.1f} MB"
        )
