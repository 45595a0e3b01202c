import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from lmadapt.api import evaluate, robustness, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.data.tagged import Example
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.evaluate.perturbations import PERTURBATIONS, TYPO_RATES, WORD_DROP_RATE, select
from lmadapt.evaluate.robustness import check_perturbable
from lmadapt.evaluate.sequence import entities
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.conftest import sentiment_rows, write_csv

# 40 words of 5+ letters without a doubled letter, so that every typo shows in the text.
SENTENCE = (
    "Quiet rivers carry bright stones under heavy winter clouds while young farmers "
    "gather grain beside their wooden houses and watch"
)
TEXT = " ".join(SENTENCE.split() * 2) + ", truly!"
N = len(TEXT.split())


def _changed_words(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a.split(), b.split(), strict=True))


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_is_seeded(name):
    p = PERTURBATIONS[name]
    assert p.on_text(TEXT, 0, 7) == p.on_text(TEXT, 0, 7) != TEXT
    if name not in ("lowercase", "uppercase", "no_punctuation"):  # these draw nothing
        assert p.on_text(TEXT, 0, 7) != p.on_text(TEXT, 1, 7)


@pytest.mark.parametrize("rate", TYPO_RATES)
@pytest.mark.parametrize("kind", ["swap", "delete", "keyboard"])
def test_typos_touch_their_share_of_words(kind, rate):
    out = PERTURBATIONS[f"typo_{kind}_{round(100 * rate)}"].on_text(TEXT, 3, 0)
    assert _changed_words(TEXT, out) == math.ceil(rate * N)
    for a, b in zip(TEXT.split(), out.split()):
        if a != b:  # one character edited
            assert len(b) == len(a) - (kind == "delete")
            assert sum(x != y for x, y in zip(a, b)) <= (2 if kind == "swap" else len(a))


def test_word_drop_removes_its_share_and_keeps_the_spacing_of_the_rest():
    text = "one  two\tthree four five six seven eight nine ten eleven"
    out = PERTURBATIONS[f"word_drop_{round(100 * WORD_DROP_RATE)}"].on_text(text, 0, 0)
    kept = out.split()
    assert len(kept) == 11 - math.ceil(WORD_DROP_RATE * 11)
    assert kept == [w for w in text.split() if w in kept]  # order kept, nothing else changed
    if "one" in kept and "two" in kept:
        assert "one  two" in out


def test_string_perturbations():
    text = "  Hello, World! It's   fine."
    assert PERTURBATIONS["lowercase"].on_text(text) == text.lower()
    assert PERTURBATIONS["uppercase"].on_text(text) == text.upper()
    assert PERTURBATIONS["no_punctuation"].on_text("Hello , World! It's fine .") == (
        "Hello World Its fine "
    )
    noisy = PERTURBATIONS["whitespace"].on_text(TEXT, 0, 0)
    assert noisy.split() == TEXT.split() and noisy != TEXT
    assert PERTURBATIONS["no_punctuation"].on_text("?!") == "?!"  # never left without words


def test_global_random_state_is_restored():
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    for p in PERTURBATIONS.values():
        p.on_text(TEXT, 5, 0)
    assert (random.random(), np.random.random()) == expected


def test_select_keeps_order_and_names_unknown_ones():
    assert [p.name for p in select(["lowercase", "typo_swap_5"])] == ["lowercase", "typo_swap_5"]
    with pytest.raises(LmadaptError, match="unknown perturbation 'typo'; known: typo_swap_5"):
        select(["typo"])


NER_SENTENCE = (
    "Yesterday , Alice Smith flew from New York to visit her friends , "
    "who live near the Tower in London ."
)


def _ner_task():
    task = build_task(parse_section(TASKS, "type", "token_classification", "task"))
    task.labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    return task


def _sentence(words, tags):
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
    offsets = [(s, s + len(w)) for s, w in zip(starts, words)]
    return Example(list(words), " ".join(words), offsets, list(tags), "s.conll", 1)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_ner_perturbations_keep_entities_and_tags_aligned(name):
    words = NER_SENTENCE.split()
    tags = ["O", "O", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"] + ["O"] * 10
    tags += ["B-LOC", "O"]
    task = _ner_task()
    sentences = [_sentence(words, tags), _sentence(["Paris"], ["B-LOC"])]
    out = task.perturbed(sentences, PERTURBATIONS[name], 0)
    if PERTURBATIONS[name].spacing:  # pre-split words: nothing to change
        assert out is None
        return
    for before, after in zip(sentences, out):
        assert len(after.words) == len(after.tags) == len(after.offsets)
        for (s, e), w in zip(after.offsets, after.words):
            assert after.text[s:e] == w
        spans = lambda ex: [(k, ex.words[s:e]) for k, s, e in entities(ex.tags)]  # noqa: E731
        assert spans(after) == spans(before)
    assert out[1].words == ["Paris"]
    assert out[0].words != words


def test_classification_perturbs_both_texts_never_the_label():
    from lmadapt.tasks.classification import Example
    from lmadapt.tasks.configs import ClassificationConfig

    for kind in ("classification", "prompt_classification"):
        task = build_task(parse_section(TASKS, "type", kind, "task"))
        (ex,) = task.perturbed([Example(TEXT, TEXT, "pos")], PERTURBATIONS["typo_swap_20"], 0)
        assert ex.label == "pos" and TEXT != ex.text != ex.text_pair != TEXT
        view = task.robustness_view(ex, {"label": "neg"})
        assert (view.gold, view.prediction, view.key) == ("pos", "neg", "neg")
    regression = build_task(ClassificationConfig(problem="regression"))
    view = regression.robustness_view(Example("a b", label=0.5), {"score": 0.3})
    assert (view.text, view.gold, view.prediction, view.key) == ("a b", "0.5", "0.3", None)
    multi = build_task(ClassificationConfig(problem="multi_label"))
    view = multi.robustness_view(Example("a", "b", ["x", "y"]), {"label": ["x"]})
    assert (view.text, view.gold, view.prediction, view.key) == ("a || b", "x, y", "x", "x")


def test_ner_flips_compare_entities_by_source_words():
    """The same entity over changed or shifted words is no flip; another span is."""
    task = _ner_task()
    words = ["the", "fox", "saw", "wolves", "near", "Paris"]
    clean = _sentence(words, ["O"] * 5 + ["B-LOC"])
    predicted = ["O", "B-PER", "O", "O", "O", "B-LOC"]  # "fox" a spurious person
    key = task.robustness_view(clean, {"tags": predicted}).key
    (upper,) = task.perturbed([clean], PERTURBATIONS["uppercase"], 0)
    view = task.robustness_view(upper, {"tags": predicted})
    assert view.key == key and view.prediction == "PER: FOX; LOC: Paris"
    (dropped,) = task.perturbed([clean], PERTURBATIONS["word_drop_10"], 0)
    gone = [i for i in range(6) if i not in dropped.origin]
    assert len(dropped.words) == 5 and gone != [1]  # seed 0 keeps "fox"
    shifted = [predicted[i] for i in dropped.origin]
    assert task.robustness_view(dropped, {"tags": shifted}).key == key
    assert task.robustness_view(dropped, {"tags": ["O"] * 4 + ["B-LOC"]}).key != key


def test_generation_refuses_in_one_line():
    task = build_task(parse_section(TASKS, "type", "generation", "task"))
    with pytest.raises(LmadaptError, match="not generation"):
        check_perturbable(task)


def test_report_config_is_checked_and_round_trips():
    base = {"task": "classification", "data": {"train": "x.csv", "dev": "d.csv"}}
    cfg = build_run_config({**base, "report": {"robustness": True, "perturbations": ["uppercase"]}})
    assert build_run_config(cfg.to_dict()) == cfg
    assert cfg.to_dict()["report"] == {
        "robustness": True,
        "perturbations": ["uppercase"],
        "seed": 0,
    }
    for report, field in [
        ({"perturbations": ["caps"]}, "report.perturbations"),
        ({"bogus": 1}, "report.bogus"),
        ({"seed": -1}, "report.seed"),
    ]:
        with pytest.raises(ConfigError) as e:
            build_run_config({**base, "report": report})
        assert e.value.field == field
    with pytest.raises(ConfigError) as e:
        build_run_config({**base, "data": {"train": "x.csv"}, "report": {"robustness": True}})
    assert e.value.field == "report.robustness"


@pytest.fixture(scope="module")
def robust_run(tmp_path_factory, tiny_bert):
    """A tiny classification run trained with report.robustness on (on its test set)."""
    tmp = tmp_path_factory.mktemp("robust")
    files = {
        "train": write_csv(tmp / "train.csv", sentiment_rows(64, seed=1)),
        "test": write_csv(tmp / "test.csv", sentiment_rows(24, seed=3)),
    }
    cfg = build_run_config(
        {
            "model": tiny_bert,
            "task": {"type": "classification"},
            "method": {"name": "full"},
            "data": {k: str(v) for k, v in files.items()},
            "train": {
                "epochs": 3,
                "batch_size": 8,
                "lr": 3e-3,
                "precision": "fp32",
                "threads": 1,
                "log_every": 4,
            },
            "report": {"robustness": True},
            "output_dir": str(tmp / "run"),
        }
    )
    metrics = train(cfg)
    return Path(metrics["run_dir"]), files["test"], metrics


def test_report_robustness_writes_json_and_section(robust_run):
    run, _, metrics = robust_run
    saved = json.loads((run / "robustness.json").read_text())
    assert saved["split"] == "test" and saved["metric"] == "accuracy"
    assert saved["clean"] == pytest.approx(metrics["test"]["accuracy"])
    assert [r["perturbation"] for r in saved["rows"]] == list(PERTURBATIONS)
    report = (run / "report.md").read_text()
    assert "## Robustness (test set, last step)" in report  # no dev set: no best checkpoint
    assert f"| typo_keyboard_{round(100 * TYPO_RATES[1])} |" in report
    assert (run / "robustness.json").stat().st_mtime_ns <= (run / "metrics.json").stat().st_mtime_ns


def test_robustness_rows_and_clean_metric(robust_run):
    run, test, _ = robust_run
    result = robustness(run, test, device="cpu", seed=2)
    ev, _ = evaluate(run, test, device="cpu")
    assert result.clean == pytest.approx(ev.metrics["accuracy"])
    assert [r.perturbation for r in result.rows] == list(
        PERTURBATIONS
    ) and not result.not_applicable
    for row in result.rows:
        assert 0 <= row.flip_rate <= 1 and 0 <= row.changed <= 1
        assert row.delta == pytest.approx(row.metric - result.clean)
    assert next(r for r in result.rows if r.perturbation == "uppercase").changed == 1.0
    assert robustness(run, test, device="cpu", seed=2) == result
    for f in result.fragile:
        assert f.flipped_by and f.prediction != f.perturbed_prediction


def test_cli_prints_the_table_and_refuses_in_one_line(robust_run, capsys, tmp_path):
    run, test, _ = robust_run
    assert main(["robustness", str(run), str(test), "--only", "lowercase,uppercase"]) == 0
    out = capsys.readouterr().out
    assert "| perturbation | what | changed | accuracy | delta | flip rate |" in out
    assert "| uppercase |" in out and "| typo_swap_5 |" not in out
    assert main(["robustness", str(run), str(test), "--only", "caps", "--json"]) == 2
    assert "unknown perturbation 'caps'" in capsys.readouterr().err
    assert main(["robustness", str(run), str(test), "--seed", "-1"]) == 2
    assert "seed must be >= 0" in capsys.readouterr().err
    assert main(["robustness", str(run), str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmadapt: error:") and len(err.strip().splitlines()) == 1
