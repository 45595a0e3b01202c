"""#29 items 8-10 and the CLI cosmetics: a damaged run directory or text no tokenizer can take is
one line and exit 2 in predict, QA predict and explain (and a clear error at serve start-up),
never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmadapt.api import read_run, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.errors import LmadaptError
from tests.conftest import sentiment_rows, write_csv
from tests.tasks.test_question_answering import qa_rows
from tests.tasks.test_token_classification import write_jsonl


def _cfg(tmp: Path, tiny_bert: str, task: dict, train_file: Path) -> dict:
    return {
        "model": tiny_bert,
        "task": task,
        "method": {"name": "lora"},
        "data": {"train": str(train_file)},
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "threads": 1},
        "output_dir": str(tmp / "run"),
    }


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_bert) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    data = write_csv(tmp / "train.csv", sentiment_rows(32, seed=1))
    return Path(
        train(build_run_config(_cfg(tmp, tiny_bert, {"type": "classification"}, data)))["run_dir"]
    )


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_bert) -> Path:
    tmp = tmp_path_factory.mktemp("qa")
    data = write_jsonl(tmp / "train.jsonl", qa_rows(16, 1))
    task = {
        "type": "question_answering",
        "max_length": 96,
        "max_question_length": 16,
        "doc_stride": 32,
    }
    return Path(train(build_run_config(_cfg(tmp, tiny_bert, task, data)))["run_dir"])


def _one_line(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("lmadapt: error:") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------ 8. text a tokenizer refuses

BAD_TEXTS = {
    "lone surrogate": "good \ud800 film",
    "invalid utf-8 argv": b"bad \xff bytes".decode("utf-8", "surrogateescape"),
    "empty": "   ",
}


@pytest.mark.parametrize("command", ["predict", "explain"])
@pytest.mark.parametrize("text", BAD_TEXTS.values(), ids=BAD_TEXTS.keys())
def test_predict_and_explain_refuse_bad_text_in_one_line(cls_run, capsys, command, text):
    _one_line(capsys, main([command, str(cls_run), "fine text", text]), "<input>, line 2")


@pytest.mark.parametrize(
    "item, field",
    [
        ({"question": "Who\ud800?", "context": "Ann met Bob."}, "question"),
        ({"question": "Who?", "context": "Ann \udcff met Bob."}, "context"),
        ({"question": "Who?", "context": "Ann met Bob.", "id": [1]}, "id"),
    ],
)
def test_qa_predict_refuses_bad_fields_in_one_line(qa_run, capsys, item, field):
    text = json.dumps(item)  # "\ud800" travels as a JSON escape, as a client would send it
    _one_line(capsys, main(["predict", str(qa_run), text]), f"field '{field}'")


def test_qa_predict_echoes_the_id_as_given(qa_run, capsys):
    item = {"id": 17, "question": "Who?", "context": "Ann met Bob."}
    assert main(["predict", str(qa_run), json.dumps(item)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["id"] == "17"


# ------------------------------------------------------------------ 9. damaged weights


def _broken_copy(run: Path, tmp_path: Path, damage: str) -> Path:
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    weights = copy / "model" / "adapter_model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "not safetensors":
        weights.write_bytes(b"\x00" * 64)
    return copy


@pytest.mark.parametrize("damage", ["missing", "truncated", "not safetensors"])
@pytest.mark.parametrize("command", ["predict", "explain"])
def test_damaged_adapter_is_one_line(cls_run, tmp_path, capsys, damage, command):
    copy = _broken_copy(cls_run, tmp_path, damage)
    _one_line(capsys, main([command, str(copy), "some text"]), str(copy / "model"))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_serve_start_up_refuses_a_damaged_adapter(cls_run, tmp_path, damage):
    from lmadapt.serve.runs import load_groups

    copy = _broken_copy(cls_run, tmp_path, damage)
    with pytest.raises(LmadaptError, match="adapter_model|no weights"):
        load_groups([copy], 8, __import__("torch").device("cpu"))


# ------------------------------------------------------------------ 10. malformed run.json

RUN_JSON = {
    "empty object": "{}",
    "a list": "[]",
    "bad json": "{not json",
    "task not an object": '{"task": [], "model": {"name": "m", "path": "p", "kind": "encoder"}}',
    "model path a number": '{"task": {}, "model": {"name": "m", "path": 3, "kind": "encoder"}}',
    "labels a number": '{"task": {"labels": 5}, '
    '"model": {"name": "m", "path": "p", "kind": "encoder"}}',
}


@pytest.mark.parametrize("text", RUN_JSON.values(), ids=RUN_JSON.keys())
def test_malformed_run_json_is_one_line(cls_run, tmp_path, capsys, text):
    copy = Path(shutil.copytree(cls_run, tmp_path / "copy"))
    (copy / "run.json").write_text(text)
    _one_line(capsys, main(["predict", str(copy), "some text"]), "run.json")
    with pytest.raises(LmadaptError, match="run.json"):
        read_run(copy)


# ------------------------------------------------------------------ cosmetics


def test_explain_says_when_it_scored_only_the_first_words(cls_run, capsys):
    long_text = " ".join(["good"] * 600)  # far past the tiny model's 128 positions
    assert main(["explain", str(cls_run), long_text, "--method", "occlusion"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out.splitlines()[0])
    cut = row["truncated"]
    assert cut["words"] == 600 and 0 < cut["words_scored"] < 600
    assert all(len(e["words"]) == cut["words_scored"] for e in row["explanations"])
    assert f"first {cut['words_scored']} of 600 words" in captured.err


def test_an_unwritable_html_path_names_the_path_not_a_temp_file(cls_run, tmp_path, capsys):
    target = tmp_path / "is_a_dir.html"
    target.mkdir()
    code = main(["explain", str(cls_run), "good", "--method", "occlusion", "--html", str(target)])
    err = _one_line(capsys, code, str(target))
    assert ".tmp" not in err
