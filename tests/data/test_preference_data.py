"""Preference pairs (data/preference.py): the layouts read, unlabelled prompts, and every bad row
named by file, line and field, refused together or left out under data.bad_rows: skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmadapt.cli import main
from lmadapt.data.chat import Conversation
from lmadapt.data.preference import PreferencePair, looks_like_pairs, read_pairs
from lmadapt.data.validation import BadRows
from lmadapt.errors import DataError
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line; a str row is written as it is (a broken line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hh(*turns: tuple[str, str]) -> str:
    """An HH-RLHF transcript: '\\n\\nHuman: ...\\n\\nAssistant: ...'."""
    return "".join(f"\n\n{who}: {said}" for who, said in turns)


GOOD = {"prompt": "what is two plus two?", "chosen": "four", "rejected": "five"}


# ---------------------------------------------------------------------- layouts


def test_prompt_string_or_messages_with_string_replies(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "  what is two plus two? ", "chosen": " four ", "rejected": "five"},
            {
                "prompt": [system("be brief"), user("hi"), assistant("hello"), user("again?")],
                "chosen": "yes",
                "rejected": "no",
            },
        ],
    )
    a, b = read_pairs(path)
    assert a == PreferencePair(
        [user("what is two plus two?")], "four", "five", file=str(path), line=1
    )
    assert b.prompt == [system("be brief"), user("hi"), assistant("hello"), user("again?")]
    assert (b.chosen, b.rejected, b.line) == ("yes", "no", 2)
    # a pair's two sides are the prompt with each reply as the last turn
    assert a.conversation(a.chosen).messages == [user("what is two plus two?"), assistant("four")]
    assert a.conversation(None).messages == [user("what is two plus two?")]


def test_trl_conversational_replies(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "prompt": [user("what is two plus two?")],
                "chosen": [assistant("four")],
                "rejected": [assistant(" five ")],
            }
        ],
    )
    (pair,) = read_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        [user("what is two plus two?")],
        "four",
        "five",
    )


def test_two_whole_dialogues_sharing_a_prefix(tmp_path):
    shared = [system("be brief"), user("hi"), assistant("hello"), user("two plus two?")]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"chosen": [*shared, assistant("four")], "rejected": [*shared, assistant("five")]},
            {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go")]},
        ],
    )
    a, b = read_pairs(path)
    assert (a.prompt, a.chosen, a.rejected) == (shared, "four", "five")
    assert (b.prompt, b.chosen, b.rejected) == ([user("hi")], "hello", "go")


def test_hh_rlhf_transcripts(tmp_path):
    chosen = hh(
        ("Human", "hi"), ("Assistant", "hello"), ("Human", "two plus two?"), ("Assistant", "four")
    )
    rejected = hh(
        ("Human", "hi"), ("Assistant", "hello"), ("Human", "two plus two?"), ("Assistant", "five")
    )
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (pair,) = read_pairs(path)
    assert pair.prompt == [user("hi"), assistant("hello"), user("two plus two?")]
    assert (pair.chosen, pair.rejected) == ("four", "five")


def test_json_list_and_csv_files(tmp_path):
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps([GOOD, {**GOOD, "rejected": "six"}]), encoding="utf-8")
    assert [p.rejected for p in read_pairs(listed)] == ["five", "six"]
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\nwhat is two plus two?,four,five\n", encoding="utf-8")
    (pair,) = read_pairs(csv)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.line) == (
        [user("what is two plus two?")], "four", "five", 2
    )  # fmt: skip


def test_unlabelled_prompts(tmp_path):
    path = write_jsonl(
        tmp_path / "u.jsonl",
        [{"prompt": "what is two plus two?"}, {"prompt": [user("hi")]}, GOOD],
    )
    prompts = read_pairs(path, labelled=False)
    assert [(p.chosen, p.rejected) for p in prompts] == [
        (None, None),
        (None, None),
        ("four", "five"),
    ]
    # labelled, a prompt alone is a row without its replies
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert (e.value.line, e.value.field) == (1, "chosen")
    # the task answers prompts (predict, serve) as generation does: the prompt, no reply
    task = build_task(parse_section(TASKS, "type", {"type": "preference"}, "task"))
    convs = task.read(str(path), labelled=False)
    assert all(isinstance(c, Conversation) for c in convs)
    assert [c.messages for c in convs] == [
        [user("what is two plus two?")],
        [user("hi")],
        [user("what is two plus two?")],
    ]


def test_looks_like_pairs():
    assert looks_like_pairs(GOOD) and looks_like_pairs({"chosen": "a", "rejected": "b"})
    assert not looks_like_pairs({"prompt": "a", "chosen": "b"})
    assert not looks_like_pairs({"messages": []})


# ---------------------------------------------------------------------- bad rows


SHARED = [user("hi"), assistant("hello"), user("two plus two?")]
BAD = {
    "missing chosen": ({"prompt": "hi", "rejected": "no"}, "chosen", "'chosen'"),
    "missing both dialogues": ({"rejected": [user("hi"), assistant("x")]}, "chosen", "missing"),
    "empty chosen": ({"prompt": "hi", "chosen": "   ", "rejected": "no"}, "chosen", "empty text"),
    "empty rejected message": (
        {"prompt": "hi", "chosen": "yes", "rejected": [assistant("")]},
        "rejected[0].content",
        "empty text",
    ),
    "empty prompt": ({"prompt": " ", "chosen": "yes", "rejected": "no"}, "prompt", "empty text"),
    "reply not text": ({"prompt": "hi", "chosen": 4, "rejected": "no"}, "chosen", "expected text"),
    "chosen == rejected": (
        {"prompt": "hi", "chosen": "same", "rejected": " same "},
        "rejected",
        "the same reply",
    ),
    "same final dialogue replies": (
        {"chosen": [*SHARED, assistant("four")], "rejected": [*SHARED, assistant("four")]},
        "rejected",
        "the same reply",
    ),
    "dialogues differ before the last reply": (
        {
            "chosen": [*SHARED, assistant("four")],
            "rejected": [user("hi"), assistant("HELLO"), user("two plus two?"), assistant("five")],
        },
        "rejected",
        "differ before their last reply (at turn 1)",
    ),
    "dialogues of different lengths": (
        {
            "chosen": [*SHARED, assistant("four")],
            "rejected": [user("two plus two?"), assistant("x")],
        },
        "rejected",
        "differ before their last reply (at turn 0)",
    ),
    "dialogue not ending in an assistant reply": (
        {"chosen": SHARED, "rejected": [*SHARED, assistant("five")]},
        "chosen",
        "must end with an assistant reply",
    ),
    "prompt not ending in user": (
        {"prompt": [user("hi"), assistant("hello")], "chosen": "yes", "rejected": "no"},
        "prompt",
        "must end with a user turn",
    ),
    "wrong role in the prompt": (
        {"prompt": [{"role": "bot", "content": "hi"}], "chosen": "yes", "rejected": "no"},
        "prompt[0].role",
        "unknown role 'bot'",
    ),
    "turns out of order": (
        {"prompt": [user("hi"), user("again")], "chosen": "yes", "rejected": "no"},
        "prompt[1].role",
        "expected an assistant turn",
    ),
    "reply list of a user turn": (
        {"prompt": "hi", "chosen": [user("yes")], "rejected": "no"},
        "chosen",
        "expected one assistant message",
    ),
    "reply list of two messages": (
        {"prompt": "hi", "chosen": [assistant("a"), assistant("b")], "rejected": "no"},
        "chosen",
        "expected one assistant message",
    ),
    "wrong role in a reply list": (
        {"prompt": "hi", "chosen": "yes", "rejected": [{"role": "bot", "content": "no"}]},
        "rejected[0].role",
        "unknown role 'bot'",
    ),
    "dialogue with a wrong role": (
        {
            "chosen": [user("hi"), {"role": "gpt", "content": "yes"}],
            "rejected": [user("hi"), assistant("no")],
        },
        "chosen[1].role",
        "unknown role 'gpt'",
    ),
    "transcript without the HH markers": (
        {
            "chosen": "Human: hi Assistant: yes",
            "rejected": hh(("Human", "hi"), ("Assistant", "no")),
        },
        "chosen",
        "transcript",
    ),
    "transcript turns out of order": (
        {
            "chosen": hh(("Assistant", "hi"), ("Human", "yes")),
            "rejected": hh(("Human", "hi"), ("Assistant", "no")),
        },
        "chosen[0].role",
        "expected a user turn",
    ),
    "transcript with an empty turn": (
        {
            "chosen": hh(("Human", " "), ("Assistant", "yes")),
            "rejected": hh(("Human", "hi"), ("Assistant", "no")),
        },
        "chosen",
        "turn 0 is empty",
    ),
    "transcript with an empty reply": (
        {
            "chosen": hh(("Human", "hi"), ("Assistant", " ")),
            "rejected": hh(("Human", "hi"), ("Assistant", "no")),
        },
        "chosen",
        "must end with an assistant reply",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_names_file_line_field(tmp_path, case):
    row, field, message = BAD[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, field), str(e.value)
    assert message in str(e.value)
    assert str(e.value).startswith(f"file {path}, line 2, field '{field}': ")


def test_bad_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"prompt": "hi", "chosen": '])
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert (e.value.file, e.value.line) == (str(path), 3)
    assert "invalid JSON" in str(e.value)


def test_every_bad_row_in_one_error(tmp_path):
    rows = [GOOD] * 10
    rows[1] = {"prompt": "hi", "chosen": "x", "rejected": "x"}
    rows[4] = "{not json"
    rows[7] = {"prompt": [user("a"), assistant("b")], "chosen": "x", "rejected": "y"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_pairs(path)
    assert [(r.line, r.field) for r in e.value.rows] == [(2, "rejected"), (5, None), (8, "prompt")]
    assert str(e.value).startswith(f"file {path}: 3 bad rows:")


def test_skip_leaves_the_bad_rows_out(tmp_path):
    rows = [{**GOOD, "chosen": f"four {i}"} for i in range(10)]
    rows[2] = {"prompt": "hi", "chosen": "", "rejected": "y"}
    rows[6] = "{not json"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    bad = BadRows(str(path), "skip", max_bad_fraction=0.25)
    pairs = read_pairs(path, bad=bad)
    bad.finish()  # within the fraction: not refused
    assert [p.line for p in pairs] == [1, 2, 4, 5, 6, 8, 9, 10]
    assert [p.chosen for p in pairs][:3] == ["four 0", "four 1", "four 3"]
    assert [(r.line, r.field) for r in bad.rows] == [(3, "chosen"), (7, None)]
    # too many for the fraction allowed: refused, every row listed
    strict = BadRows(str(path), "skip", max_bad_fraction=0.1)
    read_pairs(path, bad=strict)
    with pytest.raises(DataError, match="2 of 10 rows are bad"):
        strict.finish()


# ---------------------------------------------------------------------- the CLI


def test_cli_refuses_a_bad_train_file(tmp_path, tiny_llama, capsys):
    train = write_jsonl(
        tmp_path / "train.jsonl", [GOOD, GOOD, {"prompt": "hi", "chosen": "yes", "rejected": "yes"}]
    )
    out = tmp_path / "run"
    cfg = {
        "model": tiny_llama,
        "task": {"type": "preference"},
        "method": {"name": "lora"},
        "data": {"train": str(train)},
        "train": {"epochs": 1, "batch_size": 2, "precision": "fp32", "threads": 1},
        "output_dir": str(out),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"file {train}, line 3, field 'rejected'" in err
    assert "the same reply" in err
    assert "Traceback" not in err
    assert not out.exists()
