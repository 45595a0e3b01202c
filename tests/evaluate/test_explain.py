"""Attributions on tiny trained runs: the deciding word comes out on top, deleting the top words
hurts the prediction more than deleting random ones (faithfulness), IG is complete, pieces
merge into words, NER explains each entity, and the CLI writes a page."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadapt.api import explain, load_run, predict, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.errors import LmadaptError
from lmadapt.evaluate.explain import explain as attribute
from lmadapt.evaluate.explain import html_page
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.tasks import build_task
from lmadapt.tasks.configs import ClassificationConfig, GenerationConfig
from tests.conftest import NEG, NOUNS, POS, write_csv
from tests.tasks.test_token_classification import ner_sentences, write_jsonl

NEUTRAL = ["here", "long", "new", "short", "old", "late", "on", "out"]
FILLER = ["the", "a", "was", "it", "and", "so", "very", "this", *NOUNS]


def keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Three classes where one word decides: a positive or a negative adjective, else a neutral
    word (so that the all-pad baseline looks neutral), among 2-5 filler words at random places
    (so that deleting a filler word does not move the deciding one to an unseen position)."""
    rng = random.Random(seed)
    words = {"pos": POS[:3], "neg": NEG[:3], "neutral": NEUTRAL[:3]}
    rows = []
    for i in range(n):
        label = ("pos", "neg", "neutral")[i % 3]
        text = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        text.insert(rng.randint(0, len(text)), rng.choice(words[label]))
        rows.append((" ".join(text), label))
    return rows


def _keyword(text: str) -> str:
    (word,) = [w for w in text.split() if w in POS or w in NEG]
    return word


def _train(tmp: Path, tiny_bert: str, method: dict, lr: float, epochs: int) -> str:
    data = write_csv(tmp / "train.csv", keyword_rows(96, seed=1))
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": method,
        "data": {"train": str(data)},
        "train": {"epochs": epochs, "batch_size": 8, "precision": "fp32", "threads": 1, "lr": lr},
        "output_dir": str(tmp / "run"),
    }
    return train(build_run_config(cfg))["run_dir"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert) -> str:
    """A fully fine-tuned run that has learned the task (about 5 s on one thread)."""
    return _train(tmp_path_factory.mktemp("explain"), tiny_bert, {"name": "full"}, 3e-3, 10)


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir, "cpu")


def _test_rows(seed: int) -> list[tuple[str, str]]:
    return [(t, label) for t, label in keyword_rows(24, seed) if label != "neutral"]


def _test_texts(seed: int) -> list[str]:
    return [t for t, _ in _test_rows(seed)]


def _change(ex: dict) -> float:
    """f(input) - f(baseline) of an IG explanation: its scores' sum less the delta."""
    return sum(w["score"] for w in ex["words"]) - ex["delta"]


def test_the_deciding_word_gets_the_top_attribution(run):
    """Where the model's log-probability rises from the all-pad baseline's (it reads the label
    off a word rather than defaulting to it), that word has the highest score."""
    rows = _test_rows(seed=7)
    texts = [t for t, _ in rows]
    explained, preds = explain(run, texts, steps=64), predict(run, texts)
    assert np.mean([p["label"] == gold for p, (_, gold) in zip(preds, rows)]) >= 0.9
    read_off = 0
    for row, pred in zip(explained, preds):
        (ex,) = row["explanations"]
        assert row["method"] == "ig" and row["text"] == pred["text"]
        assert ex["label"] == pred["label"]
        assert ex["probability"] == pytest.approx(pred["probabilities"][pred["label"]], abs=1e-5)
        if _change(ex) > 1.0:
            read_off += 1
            top = max(ex["words"], key=lambda w: w["score"])
            assert top["word"] == _keyword(row["text"]), ex["words"]
    assert read_off >= len(texts) // 3  # at least one of the two classes, whichever


def _without(text: str, words: list[dict]) -> str:
    """`text` with the given words deleted (by their character offsets)."""
    cut = sorted((w["start"], w["end"]) for w in words)
    out, at = [], 0
    for start, end in cut:
        out.append(text[at:start])
        at = end
    out.append(text[at:])
    return " ".join("".join(out).split())


def test_faithfulness_top_words_matter_more_than_random_ones(run):
    """Deleting the k highest-attributed words lowers the predicted label's probability more
    than deleting k random words (mean over texts and 5 seeded draws)."""
    texts = _test_texts(seed=11)
    k = 1
    rows = explain(run, texts, steps=32)
    before = {r["text"]: r["explanations"][0] for r in rows}
    top_texts, random_texts = [], []
    for r in rows:
        words = r["explanations"][0]["words"]
        top_texts.append(_without(r["text"], sorted(words, key=lambda w: -w["score"])[:k]))
        for seed in range(5):
            random_texts.append(_without(r["text"], random.Random(seed).sample(words, k)))

    def drop(original: list[str], changed: list[str]) -> float:
        preds = predict(run, changed)
        return float(
            np.mean(
                [
                    before[t]["probability"] - p["probabilities"][before[t]["label"]]
                    for t, p in zip(original, preds)
                ]
            )
        )

    top_drop = drop(texts, top_texts)
    random_drop = drop([t for t in texts for _ in range(5)], random_texts)
    assert top_drop > random_drop + 0.1, (top_drop, random_drop)


def _assert_complete(rows: list[dict]) -> None:
    """Word scores add up to f(input) - f(baseline): captum's convergence delta is small
    against that difference, and some difference is large enough to tell."""
    for row in rows:
        (ex,) = row["explanations"]
        assert abs(ex["delta"]) <= 0.02 * abs(_change(ex)) + 1e-4, ex
    assert max(abs(_change(row["explanations"][0])) for row in rows) > 0.1


def test_integrated_gradients_is_complete(run):
    _assert_complete(explain(run, _test_texts(seed=3)[:3], steps=256))


def test_integrated_gradients_through_a_lora_adapter(tmp_path, tiny_bert):
    """peft's wrapper hands captum the base model's embedding layer. The adapter learns the task
    (lr 1e-2 sometimes collapsed to one class), so completeness is not checked on flat outputs."""
    run_dir = _train(
        tmp_path, tiny_bert, {"name": "lora", "target_modules": ["all-linear"]}, 3e-3, 20
    )
    run = load_run(run_dir, "cpu")
    assert type(run.model).__name__.startswith("Peft")
    _assert_complete(explain(run, _test_texts(seed=3)[:2], steps=256))


def test_occlusion_drops_the_deciding_word(run):
    texts = _test_texts(seed=5)[:6]
    for row in explain(run, texts, method="occlusion"):
        (ex,) = row["explanations"]
        assert row["method"] == "occlusion" and "delta" not in ex
        top = max(ex["words"], key=lambda w: w["score"])
        assert top["word"] == _keyword(row["text"])


def test_pieces_merge_into_words_with_offsets(run):
    text = "The  plot was unbelievably dull!"
    assert len(run.tokenizer.tokenize("unbelievably")) > 1  # really split into pieces
    (row,) = explain(run, [text], steps=4)
    words = row["explanations"][0]["words"]
    assert [w["word"] for w in words] == ["The", "plot", "was", "unbelievably", "dull", "!"]
    for w in words:
        assert text[w["start"] : w["end"]] == w["word"]


def test_a_pairs_second_text_has_words_of_its_own(run):
    from lmadapt.tasks.classification import Example

    pair = Example("the film was great", text_pair="Its ending, though")
    (item,) = run.task.explainables(run.model, run.tokenizer, [pair], None, 8)
    row = attribute(run.model, item, "occlusion")
    assert row["text_pair"] == pair.text_pair
    words = row["explanations"][0]["words"]
    second = [w for w in words if w.get("in") == "text_pair"]
    assert [w["word"] for w in second] == ["Its", "ending", ",", "though"]
    assert all(pair.text_pair[w["start"] : w["end"]] == w["word"] for w in second)
    assert [w["word"] for w in words if "in" not in w] == pair.text.split()
    assert "ending</span>" in html_page([row])


def test_a_chosen_label_and_an_unknown_one(run):
    (row,) = explain(run, ["the film was great"], label="neg", steps=8)
    assert row["explanations"][0]["label"] == "neg"
    with pytest.raises(LmadaptError, match="unknown label 'maybe'.*neg, neutral, pos"):
        explain(run, ["the film was great"], label="maybe")


def test_cli_writes_json_lines_and_an_html_page(run_dir, tmp_path, capsys):
    page = tmp_path / "explain.html"
    texts = ["the film was great", "a <b>bold</b> & bad plot"]
    assert main(["explain", run_dir, *texts, "--steps", "8", "--html", str(page)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["text"] for line in lines] == texts
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert "&lt;" in html and "&amp;" in html and "<b>" not in html  # the text is escaped
    n_words = sum(len(json.loads(line)["explanations"][0]["words"]) for line in lines)
    assert html.count('<span class="w"') == n_words  # every word highlighted once
    assert main(["explain", run_dir, "good", "--label", "maybe"]) == 2
    assert "unknown label 'maybe'" in capsys.readouterr().err


# ---------------------------------------------------------------------- NER


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("explain-ner")
    rows = [{"tokens": w, "tags": t} for w, t in ner_sentences(48, seed=1)]
    cfg = {
        "model": tiny_bert,
        "task": {"type": "token_classification", "max_length": 32, "stride": 8},
        "method": {"name": "full"},
        "data": {"train": str(write_jsonl(tmp / "train.jsonl", rows))},
        "train": {"epochs": 10, "batch_size": 8, "precision": "fp32", "threads": 1, "lr": 2e-3},
        "output_dir": str(tmp / "run"),
    }
    return load_run(train(build_run_config(cfg))["run_dir"], "cpu")


def test_ner_explains_each_predicted_entity(ner_run):
    text = "Yesterday Alice Smith flew to Paris ."
    (pred,) = predict(ner_run, [text])
    (row,) = explain(ner_run, [text], steps=16)
    got = [ex["entity"] for ex in row["explanations"]]
    assert got == [{k: v for k, v in e.items() if k != "score"} for e in pred["entities"]]
    assert {e["type"] for e in got} == {"PER", "LOC"}
    for ex in row["explanations"]:
        assert [w["word"] for w in ex["words"]] == text.split()
        start, end = ex["entity"]["start"], ex["entity"]["end"]
        inside = [w for w in ex["words"] if start <= w["start"] < end]
        assert max(ex["words"], key=lambda w: abs(w["score"])) in inside
    (only,) = explain(ner_run, [text], label="LOC", steps=4)
    assert [ex["entity"]["type"] for ex in only["explanations"]] == ["LOC"]
    with pytest.raises(LmadaptError, match="unknown entity type 'ORG'"):
        explain(ner_run, [text], label="ORG")
    # longer than task.max_length (32 pieces): explained whole, not cut into windows
    long = text + " They said it was fine" * 6
    (row,) = explain(ner_run, [long], label="PER", steps=4)
    assert len(row["explanations"][0]["words"]) == len(long.split())
    assert [ex["entity"]["text"] for ex in row["explanations"]][:1] == ["Alice Smith"]


# ---------------------------------------------------------------------- generation


def test_generation_explains_the_first_token_of_a_label(tiny_llama):
    """With task.labels, the label's first token as the answer's first, over the words of the
    user turn only (the template's tokens stay in the baseline)."""
    spec = resolve_model(tiny_llama)
    task = build_task(GenerationConfig(labels=["cat", "mat"]))
    tok = load_tokenizer(spec)
    model = task.build_model(spec).eval()
    text = "the cat sat on the mat?"
    examples = task.examples_from_texts([text])
    (item,) = task.explainables(model, tok, examples, None, 8)
    (row,) = [attribute(model, item, "ig", 128, tok.pad_token_id)]
    (ex,) = row["explanations"]
    assert row["text"] == text and ex["label"] in ("cat", "mat") and 0 < ex["probability"] < 1
    assert [w["word"] for w in ex["words"]] == ["the", "cat", "sat", "on", "the", "mat", "?"]
    assert all(text[w["start"] : w["end"]] == w["word"] for w in ex["words"])
    assert abs(ex["delta"]) <= 0.02 * abs(_change(ex)) + 1e-4 and abs(_change(ex)) > 1e-3
    assert sum(w is not None for w in item.word_ids) < len(item.input_ids)  # template kept
    (chosen,) = task.explainables(model, tok, examples, "mat", 8)
    assert chosen.targets[0].about["label"] == "mat"
    with pytest.raises(LmadaptError, match="unknown label 'dog'"):
        task.explainables(model, tok, examples, "dog", 8)
    with pytest.raises(LmadaptError, match="label-aware evaluation"):
        build_task(GenerationConfig()).explainables(model, tok, examples, None, 8)


@pytest.mark.parametrize(
    ("problem", "logits", "want"),
    [
        ("single_label", [0.1, 2.0, -1.0], ["b"]),
        ("multi_label", [2.0, -3.0, 1.0], ["a", "c"]),  # every label over the threshold
        ("multi_label", [-2.0, -3.0, -1.0], ["c"]),  # none: the likeliest
        ("regression", [0.7], ["score"]),
    ],
)
def test_classification_targets_per_problem(problem, logits, want):
    task = build_task(ClassificationConfig(problem=problem))
    task.labels = ["score"] if problem == "regression" else ["a", "b", "c"]
    targets = task._targets(np.array(logits), None)
    assert [t.about["label"] for t in targets] == want
    z = torch.tensor([logits])
    for t in targets:
        value = t.score(z)
        assert value.shape == (1,)
        if problem == "regression":
            assert t.probability is None and float(value) == pytest.approx(0.7)
        else:
            assert float(value.exp()) == pytest.approx(t.probability, abs=1e-5)
