"""`run_prompt` / `lmadapt prompt` end to end on the tiny Llama."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from lmadapt.errors import ConfigError, DataError
from lmadapt.evaluate.text import normalize_answer
from lmadapt.prompting.runner import run_prompt
from lmadapt.prompting.templates import TEMPLATE_DIR, Renderer, load_template
from tests.prompting.conftest import prompt_config as _cfg


def test_run_prompt_writes_report_and_seed_stats(tiny_llama, sst_files, tmp_path):
    metrics = run_prompt(_cfg(tiny_llama, sst_files, tmp_path))
    out = tmp_path / "out"
    assert metrics["seeds"] == [0, 1]
    assert set(metrics["summary"]) == {"uncalibrated", "calibrated"}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 16
    gold = [label for _, label in csv.reader(sst_files["dev"].open())][1:]
    # the metrics are those of the written predictions, seed by seed, then mean ± sd
    for variant in ("uncalibrated", "calibrated"):
        accuracy = []
        for seed in (0, 1):
            mine = [r for r in rows if r["seed"] == seed]
            assert [r["gold"] for r in mine] == gold
            for r in mine:
                probs = r[f"probabilities_{variant}"]
                assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
                assert r[f"pred_{variant}"] == max(probs, key=probs.get)
            accuracy.append(sum(r[f"pred_{variant}"] == r["gold"] for r in mine) / len(mine))
        assert [s[variant]["accuracy"] for s in metrics["per_seed"]] == pytest.approx(accuracy)
        summary = metrics["summary"][variant]["accuracy"]
        assert summary["mean"] == pytest.approx(statistics.mean(accuracy))
        assert summary["sd"] == pytest.approx(statistics.stdev(accuracy))
    # calibration changes the distribution it is applied to
    assert any(r["probabilities_calibrated"] != r["probabilities_uncalibrated"] for r in rows)
    report = (out / "report.md").read_text()
    assert "±" in report and "Confusion matrix" in report and "calibrated" in report
    assert json.loads((out / "metrics.json").read_text())["k"] == 2


def test_prefix_reuse_does_not_change_predictions(tiny_llama, sst_files, tmp_path):
    a = run_prompt(_cfg(tiny_llama, sst_files, tmp_path, output_dir=str(tmp_path / "a")))
    b = run_prompt(
        _cfg(tiny_llama, sst_files, tmp_path, output_dir=str(tmp_path / "b"), prefix_reuse=False)
    )
    assert a["summary"] == b["summary"]


def test_cli_prompt_with_overrides(tiny_llama, sst_files, tmp_path):
    import yaml

    from lmadapt.cli import main

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_cfg(tiny_llama, sst_files, tmp_path)))
    assert main(["prompt", str(path), "k=0", "calibration=false"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["k"] == 0 and metrics["seeds"] == [0] and "calibrated" not in metrics["summary"]
    assert main(["prompt", str(path), "selection=nearest", "overwrite=true"]) == 2


def test_errors_name_the_field_and_line(tiny_llama, sst_files, tmp_path):
    with pytest.raises(ConfigError, match="verbalizer"):
        run_prompt(_cfg(tiny_llama, sst_files, tmp_path, template={"input": "{text}"}))
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine film,1\nodd one,7\n")
    with pytest.raises(DataError, match="line 3.*'label'"):
        run_prompt(_cfg(tiny_llama, sst_files, tmp_path, data={"dev": str(bad)}, k=0))


def test_chat_rendering_splits_before_the_query(tiny_lm):
    _, tok = tiny_lm
    inline = Renderer(load_template({"instruction": "Classify.", "demo_style": "inline"}), tok)
    demo = inline.demo({"text": "a"}, "positive")
    prefix, suffix = inline.render([demo], {"text": "the plot"})
    assert prefix == "<|im_start|>user\nClassify.\n\na\npositive\n\n"
    assert suffix == "the plot<|im_end|>\n<|im_start|>assistant\n"


def test_chat_rendering_puts_each_demonstration_in_its_own_turns(tiny_lm):
    _, tok = tiny_lm
    named = yaml.safe_load((TEMPLATE_DIR / "sentiment.yaml").read_text())
    del named["verbalizer"]
    r = Renderer(load_template({**named, "demo_style": "turns"}), tok)
    prefix, suffix = r.render([r.demo({"text": "a"}, "positive")], {"text": "the plot"})
    assert prefix == (
        "<|im_start|>user\nClassify the sentiment of the movie review as positive or negative."
        "\n\nReview: a<|im_end|>\n<|im_start|>assistant\nSentiment: positive<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert suffix == "Review: the plot<|im_end|>\n<|im_start|>assistant\nSentiment:"


def test_generate_mode_exact_match(tiny_llama, tmp_path):
    qa = tmp_path / "qa.jsonl"
    rows = [{"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"}]
    qa.write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    metrics = run_prompt(
        {
            "model": tiny_llama,
            "mode": "generate",
            "template": "qa",
            "k": 1,
            "max_new_tokens": 4,
            "threads": 1,
            "data": {"dev": str(qa), "train": str(qa)},
            "output_dir": str(tmp_path / "gen"),
        }
    )
    assert metrics["n_eval"] == 3
    out = [json.loads(x) for x in (tmp_path / "gen" / "predictions.jsonl").read_text().splitlines()]
    assert len(out) == 3 and all(r["gold"] == "France" for r in out)
    # exact match compares SQuAD-normalised answers, and the metric is the rows' mean
    assert normalize_answer(" The FRANCE. ") == normalize_answer("france") == "france"
    matches = [normalize_answer(r["prediction"]) == "france" for r in out]
    assert [r["exact_match"] for r in out] == matches
    assert metrics["summary"]["exact_match"]["mean"] == pytest.approx(sum(matches) / 3)


def test_embedding_zero_shot_with_minilm(sst_files, tmp_path, minilm_dir):
    from lmadapt.prompting.embedding import pooling_mode

    assert pooling_mode(minilm_dir) == "mean"  # MiniLM's 1_Pooling/config.json
    metrics = run_prompt(
        {
            "mode": "embedding",
            "label_descriptions": {"0": ["bad", "awful"], "1": ["good", "great"]},
            "threads": 1,
            "data": {"dev": str(sst_files["dev"])},
            "output_dir": str(tmp_path / "emb"),
        }
    )
    assert metrics["summary"]["uncalibrated"]["accuracy"]["mean"] >= 0.75


def test_an_unknown_mode_is_refused_before_anything_is_written(tiny_llama, sst_files, tmp_path):
    with pytest.raises(ConfigError, match="field 'mode'.*verbalizer"):
        run_prompt(_cfg(tiny_llama, sst_files, tmp_path, mode="nosuch"))
    assert not (tmp_path / "out").exists()
