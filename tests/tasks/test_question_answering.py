"""Extractive question answering: readers and their errors, windows, decoding, SQuAD metrics,
training every method on a learnable toy set, prediction, serving, and the v2 null threshold."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.data.squad import Answer, QAExample
from lmadapt.data.validation import BadRows
from lmadapt.errors import DataError
from lmadapt.evaluate.perturbations import PERTURBATIONS
from lmadapt.evaluate.text import squad_exact, squad_f1, squad_normalize
from lmadapt.models import load_tokenizer, resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.question_answering import best_threshold, question_type

CODES = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden"]
FILLER = ["the", "house", "river", "stood", "near", "old", "quiet", "town", "people", "walked"]
QUESTION = "What is the code?"


def qa_rows(n: int, seed: int, unanswerable_every: int = 0) -> list[dict]:
    """Learnable toy QA: 'The code is X.' amid filler; X is a colour, the only colours in the
    text. With `unanswerable_every`, every k-th context has no code sentence (v2)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pre = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8))).capitalize()
        post = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8)))
        if unanswerable_every and i % unanswerable_every == 0:
            answers: dict = {"text": [], "answer_start": []}
            context = f"{pre}. {post}."
        else:
            code = rng.choice(CODES)
            context = f"{pre}. The code is {code}. {post}."
            answers = {"text": [code], "answer_start": [context.index(f"is {code}") + 3]}
        out.append({"id": f"q{i}", "context": context, "question": QUESTION, "answers": answers})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def squad_json(paragraphs: list[tuple[str, list[dict]]], version: str = "1.1") -> dict:
    return {
        "version": version,
        "data": [
            {"title": "T", "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs]}
        ],
    }


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def make_task(**cfg):
    return build_task(parse_section(TASKS, "type", {"type": "question_answering", **cfg}, "task"))


CONTEXT = "Paris is the capital of France. It lies on the Seine."


# ---------------------------------------------------------------------- reading


def test_reads_squad_v1_json(tmp_path):
    qas = [
        {
            "id": "a",
            "question": "Capital of France? ",
            "answers": [{"text": "Paris", "answer_start": 0}],
        },
        {
            "id": "b",
            "question": "Which river?",
            "answers": [
                {"text": "the Seine", "answer_start": 43},
                {"text": "Seine", "answer_start": 47},
            ],
        },
    ]
    path = write_json(tmp_path / "train.json", squad_json([(CONTEXT, qas)]))
    task = make_task()
    examples = task.read(str(path))
    assert [ex.id for ex in examples] == ["a", "b"]
    assert examples[0].question == "Capital of France?" and examples[0].context == CONTEXT
    assert [a.text for a in examples[1].answers] == ["the Seine", "Seine"]
    assert examples[1].where == "data[0].paragraphs[0].qas[1]"
    task.fit(examples)
    assert task.version == "v1" and "no_ans_f1" not in task.metric_names


def test_reads_squad_v2_json_and_jsonl(tmp_path):
    qas = [
        {
            "id": "a",
            "question": "Capital?",
            "answers": [{"text": "Paris", "answer_start": 0}],
            "is_impossible": False,
        },
        {
            "id": "b",
            "question": "Capital of Spain?",
            "answers": [],
            "is_impossible": True,
            "plausible_answers": [{"text": "Paris", "answer_start": 0}],
        },
    ]
    path = write_json(tmp_path / "v2.json", squad_json([(CONTEXT, qas)], "v2.0"))
    task = make_task()
    examples = task.read(str(path))
    assert examples[1].answers == []
    task.fit(examples)
    assert task.version == "v2" and "no_ans_f1" in task.metric_names
    assert task.state()["version"] == "v2"

    rows = [
        {
            "context": CONTEXT,
            "question": "Capital?",
            "answers": [{"text": "Paris", "answer_start": 0}],
        },
        {
            "id": "x",
            "context": CONTEXT,
            "question": "Spain?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    flat = make_task().read(str(write_jsonl(tmp_path / "flat.jsonl", rows)))
    assert [(ex.id, ex.line, ex.answers == []) for ex in flat] == [("1", 1, False), ("x", 2, True)]


def test_v1_refuses_unanswerable_questions(tmp_path):
    rows = qa_rows(4, 0, unanswerable_every=2)
    with pytest.raises(DataError, match=r"line 1, field 'answers': no answers, but the task is"):
        make_task(version="v1").read(str(write_jsonl(tmp_path / "t.jsonl", rows)))


OK = {"context": CONTEXT, "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}
BAD_JSONL = {
    "answer not at its offset": (
        {**OK, "answers": {"text": ["Paris"], "answer_start": [3]}},
        "answers[0].answer_start",
        "answer text 'Paris' not found at answer_start 3",
    ),
    "offset outside the context": (
        {**OK, "answers": [{"text": "Seine", "answer_start": 90}]},
        "answers[0].answer_start",
        "lies outside the context (53 characters)",
    ),
    "negative offset": (
        {**OK, "answers": [{"text": "Paris", "answer_start": -1}]},
        "answers[0].answer_start",
        "outside the context",
    ),
    "empty question": ({**OK, "question": "  "}, "question", "empty text"),
    "lone surrogate": ({**OK, "question": "Capital\ud800?"}, "question", "unpaired surrogate"),
    "missing context": ({"question": "q", "answers": []}, "context", "missing field"),
    "missing answers": ({"context": CONTEXT, "question": "q"}, "answers", "missing field"),
    "answers of another shape": ({**OK, "answers": "Paris"}, "answers", "expected a list"),
    "empty answer text": (
        {**OK, "answers": [{"text": "", "answer_start": 0}]},
        "answers[0].text",
        "non-empty answer text",
    ),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_question_names_file_line_and_field(tmp_path, case):
    row, field, message = BAD_JSONL[case]
    path = write_jsonl(tmp_path / "train.jsonl", [OK, row])
    with pytest.raises(DataError) as err:
        make_task().read(str(path))
    assert str(err.value).startswith(f"file {path}, line 2, field '{field}': ")
    assert message in str(err.value)


def test_bad_squad_json_question_names_its_id_and_position(tmp_path):
    qas = [
        {"id": "good", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q-7", "question": "River?", "answers": [{"text": "Seine", "answer_start": 40}]},
    ]
    path = write_json(tmp_path / "dev.json", squad_json([(CONTEXT, []), (CONTEXT, qas)]))
    with pytest.raises(DataError) as err:
        make_task().read(str(path))
    assert str(err.value) == (
        f"file {path}, field 'data[0].paragraphs[1].qas[1].answers[0].answer_start': question "
        "'q-7': answer text 'Seine' not found at answer_start 40 (the context there reads 'on th')"
    )
    empty = write_json(tmp_path / "e.json", squad_json([("  ", [{**qas[0], "id": "z"}])]))
    with pytest.raises(
        DataError, match=r"field 'data\[0\].paragraphs\[0\].context': question 'z': empty"
    ):
        make_task().read(str(empty))


def test_bad_questions_follow_the_bad_row_policy(tmp_path):
    rows = [OK, {**OK, "question": ""}, OK, {**OK, "answers": [{"text": "x", "answer_start": 99}]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows + [OK] * 16)
    bad = BadRows(str(path), "skip", 0.2)
    examples = make_task().read(str(path), bad=bad)
    assert len(examples) == 18 and [r.line for r in bad.rows] == [2, 4]
    bad.finish()  # 2 of 20 is within the allowed fraction
    with pytest.raises(DataError, match="2 bad rows"):
        make_task().read(str(path))  # without a policy: all of them, refused together


def test_cli_bad_data_exits_2_with_one_line(tmp_path, tiny_bert, capsys):
    bad = write_jsonl(
        tmp_path / "train.jsonl", [{**OK, "answers": [{"text": "Lyon", "answer_start": 0}]}]
    )
    cfg = tmp_path / "qa.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": tiny_bert,
                "task": {"type": "question_answering"},
                "method": {"name": "full"},
                "data": {"train": str(bad)},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 1, field 'answers[0].answer_start'" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- windows and decoding


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return load_tokenizer(resolve_model(tiny_bert))


def long_example(answer_at: int) -> QAExample:
    words = [f"w{i}" for i in range(120)]
    words[answer_at] = "golden"
    context = " ".join(words)
    return QAExample(QUESTION, context, [Answer("golden", context.index("golden"))])


def test_windows_cover_a_long_context_and_point_at_the_answer_or_cls(tokenizer):
    task = make_task(max_length=40, doc_stride=10, max_question_length=8)
    ex = long_example(70)
    feats = task.encode([ex], tokenizer)
    assert len(feats) == len(ex.windows) > 3
    assert all(len(f["input_ids"]) <= 40 for f in feats)
    holding = 0
    for feat, window in zip(feats, ex.windows):
        chars = window.offsets[window.context]
        s, e = feat["labels"]
        if chars[0, 0] <= ex.answers[0].start and ex.answers[0].end <= chars[-1, 1]:
            holding += 1
            assert ex.context[window.offsets[s, 0] : window.offsets[e, 1]] == "golden"
        else:
            assert s == e == window.cls == 0
    assert holding >= 1
    # consecutive windows overlap: every character of the context is in some window
    covered = {c for w in ex.windows for s, e in w.offsets[w.context] for c in range(s, e)}
    assert covered >= {i for i, ch in enumerate(ex.context) if not ch.isspace()}


def test_long_questions_are_cut_not_refused(tokenizer):
    task = make_task(max_length=32, doc_stride=4, max_question_length=6)
    ex = QAExample("why " * 50 + "?", CONTEXT, None)
    feats = task.encode([ex], tokenizer)
    assert feats and all(len(f["input_ids"]) <= 32 for f in feats)


def _logits_for(ex, starts, ends, base=-10.0):
    """Hand-made (T, 2) logits per window: `starts`/`ends` map window -> {position: logit}."""
    rows = []
    for k, w in enumerate(ex.windows):
        row = np.full((len(w.offsets), 2), base, dtype=np.float32)
        for pos, v in starts.get(k, {}).items():
            row[pos, 0] = v
        for pos, v in ends.get(k, {}).items():
            row[pos, 1] = v
        rows.append(row)
    return rows


def _at(window, char: int) -> int:
    """Position of the context token covering character `char`."""
    return next(p for p, (s, e) in enumerate(window.offsets) if s <= char < e)


def test_decoding_picks_the_best_valid_span_across_windows(tokenizer):
    task = make_task(max_length=40, doc_stride=10, max_question_length=8, max_answer_length=3)
    ex = long_example(70)
    feats = task.encode([ex], tokenizer)
    k = next(i for i, f in enumerate(feats) if f["labels"] != [0, 0])
    s, e = feats[k]["labels"]
    first, last = ex.windows[0].context, ex.windows[-1].context
    starts = {
        k: {s: 2.0, 1: 9.0},  # the answer; position 1 is in the question: never a span
        0: {int(first[6]): 5.0},  # a high start after ...
        len(feats) - 1: {int(last[0]): 4.0},  # ... and one too far from its end
    }
    ends = {k: {e: 2.0, 1: 9.0}, 0: {int(first[5]): 5.0}, len(feats) - 1: {int(last[-1]): 4.0}}
    (row,) = task.decode(_logits_for(ex, starts, ends), [ex])
    assert row["answer"] == "golden" and ex.context[row["start"] : row["end"]] == "golden"
    assert 0 < row["score"] <= 1


def test_v2_answers_nothing_when_the_null_score_wins(tokenizer):
    task = make_task(max_length=64, doc_stride=16, max_question_length=16, version="v2")
    ex = QAExample("Capital?", CONTEXT, [])
    task.encode([ex], tokenizer)
    w = ex.windows[0]
    paris = _at(w, 0)
    rows = _logits_for(ex, {0: {w.cls: 3.0, paris: 2.0}}, {0: {w.cls: 3.0, paris: 2.0}})
    (d,) = task.decisions(rows, [ex])
    assert d.answer == "" and d.start is None and d.null_logit - d.span_logit == 2.0
    task.threshold = 2.5  # a null score only 2 above the span no longer wins
    (d,) = task.decisions(rows, [ex])
    assert d.answer == "Paris" and (d.start, d.end) == (0, 5)


# ---------------------------------------------------------------------- metrics


def test_squad_normalisation_and_scores_by_hand():
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_normalize("an apple, a pear") == "apple pear"
    assert squad_exact("the Seine", "Seine") == 1.0
    assert squad_f1("the river Seine", "Seine") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert squad_f1("", "") == 1.0 and squad_f1("x", "") == 0.0 and squad_f1("a", "b") == 0.0


def test_evaluation_takes_the_best_gold_and_slices_by_question_type(tokenizer):
    task = make_task(max_length=64, doc_stride=16, max_question_length=16)
    exs = [
        QAExample("What river?", CONTEXT, [Answer("the Seine", 43), Answer("Seine", 47)]),
        QAExample("Who is the capital?", CONTEXT, [Answer("Paris", 0)]),
    ]
    task.encode(exs, tokenizer)

    def answering(ex, char):  # one-token answer at `char`
        pos = _at(ex.windows[0], char)
        return _logits_for(ex, {0: {pos: 5.0}}, {0: {pos: 5.0}})

    rows = answering(exs[0], CONTEXT.index("Seine")) + answering(exs[1], CONTEXT.index("France"))
    ev = task.evaluate(rows, exs)
    assert ev.metrics == {"exact_match": 0.5, "f1": 0.5}
    assert ev.details["by_question_type"] == {
        "what": {"count": 1, "exact_match": 1.0, "f1": 1.0},
        "who": {"count": 1, "exact_match": 0.0, "f1": 0.0},
    }
    (worst,) = ev.details["worst"]
    assert worst["question"] == "Who is the capital?" and worst["gold"] == "Paris"
    report = task.report(ev)
    assert "By question type" in report and "Most confident wrong answers" in report


def test_question_type_is_the_first_wh_word():
    assert question_type("In what year did it open?") == "what"
    assert question_type("How many people?") == "how"
    assert question_type("Name the river.") == "other"


def test_best_threshold_maximises_f1():
    diff = np.array([-3.0, -1.0, 0.5, 2.0])  # null minus span logit
    f1_span = np.array([1.0, 1.0, 0.0, 0.0])
    f1_null = np.array([0.0, 0.0, 1.0, 1.0])
    assert -1.0 < best_threshold(diff, f1_span, f1_null, 0.0) < 0.5
    assert best_threshold(diff, f1_null, f1_span, 0.0) < -3.0  # answering nothing is best
    assert best_threshold(np.array([np.inf]), f1_span[:1], f1_null[:1], 0.7) == 0.7


# ---------------------------------------------------------------------- training and serving


def qa_config(tmp_path, model, files, method, device="auto", **train):
    return build_run_config(
        {
            "model": model,
            "device": device,
            "task": {
                "type": "question_answering",
                "max_length": 48,
                "doc_stride": 8,
                "max_question_length": 8,
            },
            "method": method,
            "data": {"train": str(files["train"]), "dev": str(files["dev"])},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "log_every": 4,
                "precision": "fp32",
                "threads": 1,
                **train,
            },
            "output_dir": str(tmp_path / f"run_{method['name']}"),
        }
    )


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    return {
        "train": write_jsonl(root / "train.jsonl", qa_rows(64, 1)),
        "dev": write_jsonl(root / "dev.jsonl", qa_rows(24, 2)),
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_bert, qa_files):
    out = tmp_path_factory.mktemp("full")
    cfg = qa_config(out, tiny_bert, qa_files, {"name": "full"}, epochs=8, lr=2e-3)
    with pytest.MonkeyPatch.context() as mp:  # not for the tests that come after
        mp.setenv("LMADAPT_TENSORBOARD", "0")
        return train(cfg)


def test_full_fine_tuning_learns_the_toy_task(full_run, tiny_bert, qa_files, tmp_path):
    m = full_run
    assert m["task"] == "question_answering" and m["steps"] == 64
    assert set(m["dev"]) == {"exact_match", "f1", "loss"}
    assert m["dev"]["f1"] > 0.9  # a colour after "The code is", learnt in a few dozen steps
    untrained = qa_config(tmp_path, tiny_bert, qa_files, {"name": "full"}, max_steps=1, lr=1e-9)
    assert train(untrained)["dev"]["f1"] < 0.5
    run = Path(m["run_dir"])
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "By question type (first wh-word)" in report and "| what | 24 |" in report
    assert (run / "plots" / "dev_f1_by_question_type.png").is_file()
    ev, _ = evaluate(run, qa_files["dev"])
    assert ev.metrics["f1"] == pytest.approx(m["dev"]["f1"], abs=1e-6)


def test_predict_answers_with_its_span_and_score(full_run, capsys, tmp_path):
    context = "The town stood there. The code is purple. Old people walked."
    loaded = load_run(full_run["run_dir"])
    (row,) = predict(loaded, [json.dumps({"question": QUESTION, "context": context})])
    assert set(row) == {"question", "answer", "start", "end", "score"}
    assert row["answer"] == "purple" and context[row["start"] : row["end"]] == "purple"
    assert 0 < row["score"] <= 1
    assert (
        main(
            ["predict", full_run["run_dir"], json.dumps({"question": QUESTION, "context": context})]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"] == "purple"
    unlabelled = write_jsonl(
        tmp_path / "ask.jsonl", [{"id": "z", "question": QUESTION, "context": context}]
    )
    (row,) = predict(loaded, file=unlabelled)
    assert (row["id"], row["answer"]) == ("z", "purple")
    assert main(["predict", full_run["run_dir"], "What is the code?"]) == 2
    assert 'expected a JSON object {"question"' in capsys.readouterr().err


def test_v1_qa_endpoint(full_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmadapt.serve.app import create_app

    context = "The town stood there. The code is silver. Old people walked."
    items = [{"question": QUESTION, "context": context}] * 2
    with TestClient(create_app([full_run["run_dir"]])) as c:
        r = c.post("/v1/qa", json={"items": items})
        assert r.status_code == 200, r.text
        rows = r.json()["results"]
        assert [x["answer"] for x in rows] == ["silver", "silver"]
        assert rows[0]["start"] == context.index("silver")
        assert (
            c.post("/v1/qa", json={"items": [{"question": " ", "context": context}]}).status_code
            == 422
        )
        assert c.post("/v1/qa", json={"items": [{"question": QUESTION}]}).status_code == 422
        assert c.post("/v1/classify", json={"texts": ["x"]}).status_code == 400


@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "target_modules": ["all-linear"]},
        {"name": "bitfit"},
        {"name": "ia3"},
        {"name": "prompt_tuning"},
        {"name": "adalora"},  # peft calls the model's forward directly, and ...
        {"name": "prefix_tuning"},  # ... builds QA outputs itself: the task reads them
    ],
    ids=lambda m: m["name"],
)
def test_methods_train_and_reload_the_same_predictions(tmp_path, tiny_bert, qa_files, method):
    """Every method trains the start/end head; the saved artifact reloads to the same scores."""
    m = train(qa_config(tmp_path, tiny_bert, qa_files, method, epochs=2, lr=1e-2))
    assert np.isfinite(m["dev"]["loss"]) and m["trainable_params"] < m["total_params"]
    ev, _ = evaluate(m["run_dir"], qa_files["dev"])  # reloaded from the saved artifact
    assert ev.metrics == pytest.approx(m["dev"], abs=1e-5)


def test_a_lora_qa_run_exports_merged_with_the_same_answers(tmp_path, tiny_bert, qa_files):
    from lmadapt.export import export_merged

    lora = {"name": "lora", "target_modules": ["all-linear"]}
    m = train(qa_config(tmp_path, tiny_bert, qa_files, lora, epochs=2, lr=1e-2))
    result = export_merged(m["run_dir"], tmp_path / "merged")  # start/end logits checked
    assert result["max_abs_diff"] <= 1e-4
    merged = load_run(m["run_dir"])
    merged.model = merged.task.build_model(resolve_model(str(tmp_path / "merged")))
    pair = ['{"question": "What is the code?", "context": "The code is red. It rained."}']
    assert predict(merged, pair) == predict(m["run_dir"], pair)


def test_v2_run_stores_its_tuned_null_threshold(tmp_path, tiny_bert):
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", qa_rows(48, 1, unanswerable_every=3)),
        "dev": write_jsonl(tmp_path / "dev.jsonl", qa_rows(18, 2, unanswerable_every=3)),
    }
    m = train(qa_config(tmp_path, tiny_bert, files, {"name": "full"}, epochs=4, lr=2e-3))
    assert {"has_ans_f1", "no_ans_f1", "has_ans_exact_match", "no_ans_exact_match"} <= set(m["dev"])
    state = json.loads((Path(m["run_dir"]) / "run.json").read_text())["task"]
    assert state["version"] == "v2" and np.isfinite(state["null_score_diff_threshold"])
    assert (
        f"{state['null_score_diff_threshold']:.4f} (tuned on dev)"
        in (Path(m["run_dir"]) / "report.md").read_text()
    )
    loaded = load_run(m["run_dir"])
    assert loaded.task.threshold == state["null_score_diff_threshold"]
    ev, _ = evaluate(m["run_dir"], files["dev"])
    assert ev.metrics == pytest.approx(m["dev"], abs=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qa_trains_and_answers_on_the_gpu(full_run, tmp_path, tiny_bert, qa_files):
    """Start and end logits come back from the GPU (inference.OnDevice moves every tensor)."""
    m = train(qa_config(tmp_path, tiny_bert, qa_files, {"name": "lora"}, "cuda", max_steps=2))
    assert m["steps"] == 2 and np.isfinite(m["dev"]["loss"])
    context = "The town stood there. The code is purple. Old people walked."
    texts = [json.dumps({"question": QUESTION, "context": context})]
    on_cpu = predict(load_run(full_run["run_dir"], "cpu"), texts)
    on_gpu = predict(load_run(full_run["run_dir"], "cuda"), texts)
    assert [r["answer"] for r in on_gpu] == [r["answer"] for r in on_cpu]
    assert on_gpu[0]["score"] == pytest.approx(on_cpu[0]["score"], abs=1e-4)


def test_robustness_perturbs_the_questions_and_keeps_the_answers(full_run, qa_files):
    from lmadapt.api import robustness

    result = robustness(full_run["run_dir"], qa_files["dev"], perturbations=["uppercase"])
    assert result.metric == "f1" and result.clean == pytest.approx(full_run["dev"]["f1"])
    (row,) = result.rows
    assert row.changed == 1.0 and 0.0 <= row.flip_rate <= 1.0
    ex = make_task().read(str(qa_files["dev"]))[0]
    (perturbed,) = make_task().perturbed([ex], PERTURBATIONS["uppercase"], 0)
    assert perturbed.question == ex.question.upper() and perturbed.context == ex.context
    assert perturbed.answers == ex.answers
