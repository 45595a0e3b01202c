"""Token classification: readers and tag schemes, windows, metrics, training and prediction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.cli import main
from lmadapt.config import ConfigError, build_run_config
from lmadapt.data.batching import length_grouped_batches, shuffled_batches
from lmadapt.data.tagged import split_words
from lmadapt.errors import DataError, LmadaptError
from lmadapt.evaluate.sequence import entities, sequence_metrics
from lmadapt.hooks import Hook
from lmadapt.methods import METHODS
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.token_classification import IGNORE, word_windows

FIRST = ["Alice", "Bob", "Carol", "Dmitri", "Erin", "Frank", "Grace", "Hiro"]
LAST = ["Smith", "Jones", "Novak", "Okafor"]
PLACES = [["Paris"], ["Berlin"], ["New", "York"], ["Tokyo"], ["Lima"], ["Buenos", "Aires"]]
FILLER = ["the", "a", "report", "said", "today", "quietly", "again", "and"]


def ner_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Learnable toy NER: names and places from fixed lists in a few templates (IOB2)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        person = [rng.choice(FIRST)] + ([rng.choice(LAST)] if i % 3 else [])
        place = rng.choice(PLACES)
        words = person + ["flew", "to"] + place + [rng.choice(FILLER), "."]
        tags = ["B-PER"] + ["I-PER"] * (len(person) - 1) + ["O", "O"]
        tags += ["B-LOC"] + ["I-LOC"] * (len(place) - 1) + ["O", "O"]
        if i % 2:
            words, tags = ["Yesterday", ","] + words, ["O", "O"] + tags
        out.append((words, tags))
    return out


def write_conll(
    path: Path, sents: list[tuple[list[str], list[str]]], docstart: bool = True
) -> Path:
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for words, tags in sents:
        lines += [f"{w} X X {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_task(**cfg):
    return build_task(parse_section(TASKS, "type", {"type": "token_classification", **cfg}, "task"))


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


# ---------------------------------------------------------------------- readers and schemes


def test_conll_reader_skips_docstart_and_keeps_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "-DOCSTART- -X- -X- O\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER",
        encoding="utf-8",
    )
    task = make_task(scheme="iob2")
    exs = task.read(str(path))
    assert [ex.words for ex in exs] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [ex.tags for ex in exs] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert exs[1].lines == [8, 9] and exs[1].line == 8
    assert exs[0].text[slice(*exs[0].offsets[1])] == "rejects"
    # another column can be the tag (here the chunk column), and .txt is CoNLL too
    txt = tmp_path / "a.txt"
    txt.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    assert make_task(tag_column=2).read(str(txt))[0].tags == ["B-NP", "B-VP"]


def test_iob1_and_bioes_are_converted_to_iob2(tmp_path):
    iob1 = write_conll(
        tmp_path / "iob1.conll",
        [(list("abcde"), ["I-PER", "I-PER", "B-PER", "O", "I-LOC"])],
    )
    expected = ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    assert make_task().read(str(iob1))[0].tags == expected  # auto-detected
    assert make_task(scheme="iob1").read(str(iob1))[0].tags == expected
    bioes = write_conll(
        tmp_path / "bioes.conll",
        [(list("abcdef"), ["B-PER", "I-PER", "E-PER", "S-LOC", "O", "S-PER"])],
    )
    want = ["B-PER", "I-PER", "I-PER", "B-LOC", "O", "B-PER"]
    assert make_task().read(str(bioes))[0].tags == want
    assert make_task(scheme="bioes").read(str(bioes))[0].tags == want


@pytest.mark.parametrize(
    ("scheme", "tags", "bad", "message"),
    [
        ("iob2", ["O", "B-PER", "O", "I-PER"], 3, "must start with B-PER"),
        ("iob2", ["B-PER", "I-LOC"], 1, "must start with B-LOC"),
        ("iob2", ["O", "B_PER"], 1, "malformed tag"),
        ("iob2", ["S-PER", "O"], 0, "not valid in scheme iob2"),
        ("bioes", ["B-PER", "O"], 0, "must be followed by"),
        ("bioes", ["S-PER", "I-PER"], 0, "cannot be followed by"),
        ("auto", ["O", "PER"], 1, "malformed tag"),
    ],
)
def test_invalid_tags_name_file_and_line(tmp_path, scheme, tags, bad, message):
    path = write_conll(tmp_path / "bad.conll", [(["w"] * 2, ["O", "O"]), (["w"] * len(tags), tags)])
    with pytest.raises(DataError, match=message) as err:
        make_task(scheme=scheme).read(str(path))
    # lines: 1 DOCSTART, 2 blank, 3-4 first sentence, 5 blank, then the second sentence
    assert err.value.file == str(path) and err.value.line == 6 + bad


def test_conll_structure_errors(tmp_path):
    path = tmp_path / "cols.conll"
    path.write_text("a X O\nb O\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected 3 columns") as err:
        make_task().read(str(path))
    assert err.value.line == 2
    path.write_text("a O\n", encoding="utf-8")
    with pytest.raises(DataError, match="tag_column=5"):
        make_task(tag_column=5).read(str(path))
    path.write_text("-DOCSTART- O\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no sentences"):
        make_task().read(str(path))


def test_jsonl_tokens_and_text_spans(tmp_path):
    text = "Dr.  Alice Smith visited Berlin-based ACME."
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"tokens": ["Alice", "Smith", "smiled"], "tags": ["B-PER", "I-PER", "O"]},
            {
                "text": text,
                "spans": [
                    {"start": 5, "end": 16, "label": "PER"},
                    {"start": 25, "end": 31, "label": "LOC"},
                    {"start": 38, "end": 42, "label": "ORG"},
                ],
            },
        ],
    )
    a, b = make_task().read(str(path))
    assert a.tags == ["B-PER", "I-PER", "O"] and a.text == "Alice Smith smiled"
    assert b.words == ["Dr", ".", "Alice", "Smith", "visited", "Berlin", "-based", "ACME", "."]
    assert b.tags == ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O"]
    assert all(b.text[s:e] == w for w, (s, e) in zip(b.words, b.offsets))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"tokens": ["a", "b"], "tags": ["O"]}, "1 tags for 2 words"),
        ({"tokens": ["a", " "], "tags": ["O", "O"]}, "word 1"),
        ({"text": "ab cd", "spans": [{"start": 0, "end": 9, "label": "X"}]}, "outside the text"),
        (
            {
                "text": "ab cd",
                "spans": [
                    {"start": 0, "end": 4, "label": "X"},
                    {"start": 3, "end": 5, "label": "Y"},
                ],
            },
            "overlap",
        ),
        ({"text": "ab cd", "spans": [{"start": 0, "end": 2, "label": "A B"}]}, "non-blank word"),
        ({"sentence": "ab"}, "needs 'tokens'"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["x"], "tags": ["B-X"]}, row])
    with pytest.raises(DataError, match=message) as err:
        make_task().read(str(path))
    assert err.value.line == 2


def test_unseen_entity_type_and_config_checks(tmp_path):
    task = make_task()
    task.fit(task.read(str(write_conll(tmp_path / "t.conll", ner_sentences(4))), "conll"))
    assert task.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    dev = task.read(str(write_conll(tmp_path / "d.conll", [(["ACME", "x"], ["B-ORG", "O"])])))
    with pytest.raises(DataError, match="'ORG' does not occur") as err:
        task.check(dev)
    assert err.value.line == 3
    with pytest.raises(ConfigError, match="task.stride"):
        make_task(max_length=16, stride=9)


def test_split_words_keeps_offsets():
    text = "The U.S. and AT&T met in New York on 1996-08-22, said Peter's aide."
    spans = split_words(text)
    words = [text[s:e] for s, e in spans]
    assert words[:4] == ["The", "U.S.", "and", "AT&T"]
    assert "1996-08-22" in words and words[-4:] == ["Peter", "'s", "aide", "."]
    assert split_words("HelloWorld!", [0, 5, 5, 10]) == [(0, 5), (5, 10), (10, 11)]


# ---------------------------------------------------------------------- windows and alignment


def test_word_windows_cover_every_word_whole():
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.choice([0, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 60))]
        budget, stride = rng.randint(8, 20), rng.randint(0, 4)
        wins = word_windows(counts, budget, stride)
        assert wins[0][0] == 0 and wins[-1][1] == len(counts)
        for (a, e), (a2, e2) in zip(wins, wins[1:]):
            assert a < a2 <= e < e2  # progress, no gap
            assert sum(counts[a2:e]) <= stride
        for a, e in wins:
            assert e - a == 1 or sum(counts[a:e]) <= budget


def test_long_sentence_is_windowed_and_merged(tokenizer):
    words, tags = [], []
    for sent_words, sent_tags in ner_sentences(12, seed=3):
        words += sent_words
        tags += sent_tags
    words[5] = "Supercalifragilisticexpialidocious"  # many subwords; must stay whole
    task = make_task(max_length=24, stride=6)
    from lmadapt.data.tagged import Example

    ex = Example(words, " ".join(words), [], tags)
    task.fit([ex])
    feats = task.encode([ex], tokenizer)
    assert len(feats) == len(ex.windows) > 3
    assert all(len(f["input_ids"]) <= 24 for f in feats)
    owned = sorted(w for win in ex.windows for _, w in win.owned)
    assert owned == list(range(len(words)))  # every word predicted by exactly one window
    # labels only on first subwords; logits built from them merge back to the gold tags
    logits = []
    for f in feats:
        lab = np.array(f["labels"])
        assert lab[0] == IGNORE and lab[-1] == IGNORE  # [CLS], [SEP]
        arr = np.zeros((len(lab), len(task.labels)), dtype=np.float32)
        arr[lab != IGNORE, lab[lab != IGNORE]] = 5.0
        logits.append(arr)
    assert task.predicted_tags(logits, [ex]) == [tags]
    n_first = sum(int((np.array(f["labels"]) != IGNORE).sum()) for f in feats)
    all_task = make_task(max_length=24, stride=6, label_all_subwords=True)
    all_task.labels = task.labels
    all_feats = all_task.encode([ex], tokenizer)
    assert sum(int((np.array(f["labels"]) != IGNORE).sum()) for f in all_feats) > n_first


def test_subword_continuations_of_b_get_i(tokenizer):
    from lmadapt.data.tagged import Example

    task = make_task(label_all_subwords=True)
    ex = Example(["Dmitrijevskaya", "ran"], "Dmitrijevskaya ran", [], ["B-PER", "O"])
    task.fit([ex])
    (feat,) = task.encode([ex], tokenizer)
    names = [task.labels[i] if i != IGNORE else None for i in feat["labels"]]
    assert names[0] is None and names[1] == "B-PER" and names[-2:] == ["O", None]
    assert set(names[2:-2]) == {"I-PER"}


# ---------------------------------------------------------------------- metrics


def test_seqeval_metrics_on_a_hand_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["B-PER", "O"]]
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    # lenient: PER 1 right + 1 spurious, LOC right (I-LOC opens it), ORG missed
    ev = sequence_metrics(gold, pred, labels)
    assert ev.metrics["precision"] == pytest.approx(2 / 3)
    assert ev.metrics["recall"] == pytest.approx(2 / 3)
    assert ev.metrics["f1"] == pytest.approx(2 / 3)
    assert ev.metrics["accuracy"] == pytest.approx(4 / 6)
    assert ev.details["per_type"]["PER"]["precision"] == pytest.approx(0.5)
    assert ev.metrics["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # strict IOB2: the lone I-LOC is no entity
    strict = sequence_metrics(gold, pred, labels, strict=True)
    assert strict.metrics["precision"] == pytest.approx(1 / 2)
    assert strict.metrics["recall"] == pytest.approx(1 / 3)
    assert strict.metrics["f1"] == pytest.approx(0.4)
    cm = np.array(ev.details["confusion_matrix"])
    assert cm.sum() == 6 and cm[labels.index("B-ORG"), labels.index("B-PER")] == 1
    empty = sequence_metrics([["O"]], [["O"]], labels)
    assert empty.metrics["f1"] == 0.0 and empty.metrics["accuracy"] == 1.0


def test_entity_chunking_matches_seqeval():
    from seqeval.metrics.sequence_labeling import get_entities
    from seqeval.scheme import IOB2, Entities

    rng = random.Random(1)
    tags = ["O", "B-A", "I-A", "B-B", "I-B"]
    for _ in range(300):
        seq = [rng.choice(tags) for _ in range(rng.randint(1, 12))]
        assert entities(seq) == [(t, s, e + 1) for t, s, e in get_entities(seq)]
        strict = Entities([seq], IOB2).entities[0]
        assert entities(seq, strict=True) == [(e.tag, e.start, e.end) for e in strict]


# ---------------------------------------------------------------------- end to end


@pytest.fixture
def ner_files(tmp_path) -> dict[str, Path]:
    train_rows = [{"tokens": w, "tags": t} for w, t in ner_sentences(48, seed=1)]
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", train_rows),
        "dev": write_conll(tmp_path / "dev.conll", ner_sentences(16, seed=2)),
    }


def ner_config(tmp_path, model, files, method, **train):
    return build_run_config(
        {
            "model": model,
            "task": {"type": "token_classification", "max_length": 16, "stride": 4},
            "method": method,
            "data": {"train": str(files["train"]), "dev": str(files["dev"])},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "log_every": 2,
                "precision": "fp32",
                "threads": 1,
                **train,
            },
            "output_dir": str(tmp_path / f"run_{method['name']}"),
        }
    )


class _FirstBatches(Hook):
    def on_train_start(self, trainer):
        self.batches = [list(b) for b in trainer.batches_for_epoch(0)]
        self.lengths = trainer.lengths
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        self.groups = [
            {"lr": g["lr"], "names": [names[id(p)] for p in g["params"]]}
            for g in trainer.optimizer.param_groups
        ]


@pytest.mark.parametrize("group_by_length", [None, True])
def test_random_batches_unless_asked(tmp_path, tiny_bert, ner_files, group_by_length):
    """NER trains on random batches by default (length-grouped ones learned slower, see
    TokenClassificationTask.groups_by_length); train.group_by_length: true still groups."""
    seen = _FirstBatches()
    cfg = ner_config(tmp_path, tiny_bert, ner_files, {"name": "full"}, max_steps=1, batch_size=8)
    cfg.train.group_by_length = group_by_length
    train(cfg, hooks=[seen])
    grouped = [list(b) for b in length_grouped_batches(seen.lengths, 8, cfg.train.seed)]
    random = [list(b) for b in shuffled_batches(len(seen.lengths), 8, cfg.train.seed)]
    assert grouped != random
    assert seen.batches == (random if group_by_length is None else grouped)


@pytest.mark.parametrize(("method", "head"), [({"name": "full"}, 1e-3), ({"name": "lora"}, 5e-3)])
def test_head_learns_at_least_at_the_floor(tmp_path, tiny_bert, ner_files, method, head):
    """The new classifier trains at max(run's rate, 1e-3); the backbone at the run's rate."""
    seen = _FirstBatches()
    lr = 5e-5 if method["name"] == "full" else 5e-3
    cfg = ner_config(tmp_path, tiny_bert, ner_files, method, max_steps=1, lr=lr)
    train(cfg, hooks=[seen])
    rate = {n: g["lr"] for g in seen.groups for n in g["names"]}
    heads = {n for n in rate if "classifier" in n.split(".")}
    assert heads and {rate[n] for n in heads} == {head}
    assert {r for n, r in rate.items() if n not in heads} == {lr}


@pytest.mark.parametrize(
    ("method", "lr", "epochs"),
    [({"name": "lora", "target_modules": ["all-linear"]}, 1e-2, 20), ({"name": "full"}, 2e-3, 10)],
)
def test_train_evaluate_predict(tmp_path, tiny_bert, ner_files, method, lr, epochs):
    cfg = ner_config(tmp_path, tiny_bert, ner_files, method, epochs=epochs, lr=lr, eval_every=30)
    metrics = train(cfg)
    run = Path(metrics["run_dir"])
    assert metrics["task"] == "token_classification" and metrics["steps"] == 6 * epochs
    assert set(metrics["dev"]) >= {"f1", "precision", "recall", "macro_f1", "accuracy", "loss"}
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "Entities per type" in report and "| PER |" in report
    assert (run / "plots" / "dev_entity_f1.png").is_file()
    assert (run / "plots" / "dev_tag_confusion_matrix.png").is_file()
    assert "### Sentences with the most entity errors" in report
    assert "### Entity F1 by sentence length" in report
    assert "### Calibration" in report and (run / "plots" / "dev_reliability.png").is_file()
    t = metrics["temperature"]
    assert json.loads((run / "run.json").read_text())["task"]["temperature"] == t
    assert {"ece", "ece_calibrated"} <= set(metrics["dev"])
    assert metrics["dev"]["f1"] > 0.9  # the toy task is learnable in a few dozen steps

    ev, _ = evaluate(run, ner_files["dev"])
    assert ev.metrics["f1"] == pytest.approx(metrics["dev"]["f1"], abs=1e-6)
    loaded = load_run(run)
    text = "Yesterday,  Alice  Smith flew to New York again."
    (row,) = predict(loaded, [text])
    assert row["text"] == text and len(row["tokens"]) == len(row["tags"])
    assert [(e["type"], e["text"]) for e in row["entities"]] == [
        ("PER", "Alice  Smith"),
        ("LOC", "New York"),
    ]
    for ent in row["entities"]:
        assert text[ent["start"] : ent["end"]] == ent["text"]
        assert ent["type"] in ("PER", "LOC") and 0 < ent["score"] <= 1
    loaded.task.cfg.calibrate = True  # the same entities, scores from softmax(logits / T)
    (calibrated,) = predict(loaded, [text])
    assert [e["text"] for e in calibrated["entities"]] == [e["text"] for e in row["entities"]]
    assert t == 1.0 or calibrated["entities"][0]["score"] != row["entities"][0]["score"]
    loaded.task.cfg.calibrate = False
    pre = write_jsonl(tmp_path / "pre.jsonl", [{"tokens": ["Grace", "flew", "to", "Tokyo"]}])
    (row,) = predict(loaded, file=pre)
    assert row["tokens"] == ["Grace", "flew", "to", "Tokyo"]
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in row["entities"]] == [
        ("PER", "Grace", 0, 5),
        ("LOC", "Tokyo", 14, 19),
    ]


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_trains_the_task(tmp_path, tiny_bert, ner_files, method):
    """Methods see only head_modules and kind; prompt methods' virtual tokens are skipped."""
    cfg = ner_config(tmp_path, tiny_bert, ner_files, {"name": method}, epochs=1, lr=1e-3)
    metrics = train(cfg)
    assert metrics["steps"] == 6 and np.isfinite(metrics["dev"]["loss"])
    (row,) = predict(load_run(metrics["run_dir"]), ["Alice flew to New York ."])
    assert len(row["tags"]) == len(row["tokens"]) == 6


def test_error_analysis_lists_worst_sentences_and_length_slices(tokenizer):
    task = make_task()
    task.labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    sentences = [  # words, gold tags, predicted tags
        ("Alice flew to Paris", "B-PER O O B-LOC", "B-PER O O B-LOC"),
        (
            "Bob Smith met Carol in New York today",
            "B-PER I-PER O B-PER O B-LOC I-LOC O",
            "B-PER O O O O B-LOC I-LOC O",
        ),
        ("Erin saw Lima", "B-PER O B-LOC", "B-LOC O B-LOC"),
        ("Hiro left", "B-PER O", "B-PER O"),
    ]
    examples = task.examples_from_texts([text for text, _, _ in sentences])
    for ex, (_, gold, _) in zip(examples, sentences):
        ex.tags = gold.split()
    feats = task.encode(examples, tokenizer)
    index = {t: i for i, t in enumerate(task.labels)}
    logits = []
    for ex, feat, (_, _, pred) in zip(examples, feats, sentences):  # one window each
        rows = np.zeros((len(feat["input_ids"]), len(task.labels)), dtype=np.float32)
        for pos, w in ex.windows[0].owned:
            rows[pos, index[pred.split()[w]]] = 5.0
        logits.append(rows)
    ev = task.evaluate(logits, examples)
    worst = ev.details["worst_sentences"]
    assert [(r["sentence"], r["errors"]) for r in worst] == [
        ("Bob Smith met Carol in New York today", 3),  # two people missed, one spurious
        ("Erin saw Lima", 2),
    ]
    assert (worst[1]["gold"], worst[1]["predicted"]) == (
        "PER: Erin; LOC: Lima",
        "LOC: Erin; LOC: Lima",
    )
    slices = [(s["shortest"], s["count"], s["value"]) for s in ev.details["length_slices"]]
    assert slices == [(2, 1, 1.0), (3, 1, 0.5), (4, 1, 1.0), (8, 1, pytest.approx(0.4))]
    report = task.report(ev)
    assert "| Erin saw Lima | 2 | PER: Erin; LOC: Lima | LOC: Erin; LOC: Lima |" in report
    assert "| 8 | 1 | 0.4000 |" in report
    # calibration over the 17 words: 14 right, each with the same confidence
    confidence = np.exp(5.0) / (np.exp(5.0) + 4)
    assert ev.metrics["ece"] == pytest.approx(abs(14 / 17 - confidence))
    assert "### Calibration" in report and "one prediction per word" in report
    assert task.fit_calibration({"dev": ev}) == {"temperature": task.temperature}
    assert "ece_calibrated" in ev.metrics and task.state()["temperature"] == task.temperature
    task.cfg.calibrate = True
    task.temperature = None
    with pytest.raises(LmadaptError, match="no fitted temperature"):
        task.decode(logits, examples)


def test_decode_offsets_slice_the_entity_text(tokenizer):
    task = make_task()
    task.labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    text = "  Dr.  Alice   Smith met him in New\tYork, said O'Neil."
    (ex,) = task.examples_from_texts([text])
    feats = task.encode([ex], tokenizer)
    gold = {
        "Alice": "B-PER",
        "Smith": "I-PER",
        "New": "B-LOC",
        "York": "I-LOC",
        "O": "B-PER",
        "'Neil": "I-PER",
    }
    (win,) = ex.windows
    arr = np.zeros((len(feats[0]["input_ids"]), len(task.labels)), dtype=np.float32)
    for pos, w in win.owned:
        arr[pos, task.labels.index(gold.get(ex.words[w], "O"))] = 4.0
    (row,) = task.decode([arr], [ex])
    got = [(e["type"], e["text"], text[e["start"] : e["end"]]) for e in row["entities"]]
    assert got == [
        ("PER", "Alice   Smith", "Alice   Smith"),
        ("LOC", "New\tYork", "New\tYork"),
        ("PER", "O'Neil", "O'Neil"),
    ]
    assert all(0.9 < e["score"] <= 1 for e in row["entities"])


@pytest.mark.slow  # the real embedded encoder, end to end
def test_minilm_end_to_end_and_cli(tmp_path, ner_files, capsys):
    rows = [{"tokens": w, "tags": t} for w, t in ner_sentences(20, seed=4)]
    files = {"train": write_jsonl(tmp_path / "small.jsonl", rows), "dev": ner_files["dev"]}
    cfg = ner_config(
        tmp_path, "minilm", files, {"name": "lora"}, max_steps=3, lr=1e-3, batch_size=10
    )
    metrics = train(cfg)
    assert metrics["steps"] == 3 and metrics["model"] == "minilm"
    assert main(["predict", metrics["run_dir"], "Alice flew to Paris."]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens"] == ["Alice", "flew", "to", "Paris", "."]
    for ent in row["entities"]:
        assert row["text"][ent["start"] : ent["end"]] == ent["text"]
