"""Preference pairs: a prompt (chat messages) and two replies to it, one preferred.

Three layouts are read, told apart by the fields of each record:

- `prompt` (a list of messages, or one string taken as a user turn) with `chosen` and
  `rejected` replies (strings, or one-message lists of an assistant turn: TRL's conversational
  form);
- `chosen` and `rejected` as two whole dialogues (message lists) that share every turn but the
  last assistant one, which is the pair's two replies;
- the same as strings in HH-RLHF's `\\n\\nHuman: ... \\n\\nAssistant: ...` transcript form.

Errors name file, line and field (`prompt[2].role`, `rejected`), as the other readers do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.data.chat import ROLES, Conversation, check_turn_order, message_turns, text_field
from lmadapt.data.readers import Record, read_records
from lmadapt.data.validation import BadRows, collect

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]
    """role/content messages ending with a user turn: what both replies answer."""
    chosen: str | None
    """The preferred reply; None for a prompt read to be answered (prediction)."""
    rejected: str | None
    file: str = ""
    line: int = 0

    def conversation(self, reply: str | None) -> Conversation:
        """The prompt followed by `reply` as an assistant turn (the prompt alone for None)."""
        turn = [] if reply is None else [{"role": "assistant", "content": reply}]
        return Conversation(self.prompt + turn, file=self.file, line=self.line)


def _messages(record: Record, key: str) -> list[dict[str, str]]:
    """A message list under `key` (role/content objects, roles checked, order checked)."""
    return message_turns(record, key, "role", "content", {r: r for r in ROLES})


def _reply(record: Record, key: str) -> str:
    """A reply: a non-empty string, or a list holding one assistant message."""
    value = _required(record, key)
    if isinstance(value, list):
        turns = _messages_unordered(record, key)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise record.error(
                "expected one assistant message (the reply), got "
                f"{len(turns)} message(s) with roles {[t['role'] for t in turns]}",
                key,
            )
        return turns[0]["content"]
    return text_field(record, value, key).strip()


def _messages_unordered(record: Record, key: str) -> list[dict[str, str]]:
    """Role/content objects without the user-first order check (a reply list starts with the
    assistant)."""
    out = []
    for i, turn in enumerate(record.fields[key]):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise record.error(f"expected an object, got {type(turn).__name__}", where)
        role = turn.get("role")
        if role not in ROLES:
            raise record.error(
                f"unknown role {role!r}; one of: {', '.join(ROLES)}", f"{where}.role"
            )
        content = text_field(record, turn.get("content"), f"{where}.content").strip()
        out.append({"role": role, "content": content})
    return out


def _transcript(record: Record, key: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    text = text_field(record, record.fields[key], key)
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise record.error(
            "a dialogue string must be a transcript of '\\n\\nHuman: ' and '\\n\\nAssistant: ' "
            "turns (or give a 'prompt' field)",
            key,
        )
    messages = [
        {"role": _HH_ROLES[who], "content": said.strip()}
        for who, said in zip(parts[1::2], parts[2::2])
    ]
    for i, m in enumerate(messages):
        if not m["content"] and i < len(messages) - 1:
            raise record.error(f"turn {i} is empty", key)
    check_turn_order(record, key, "role", messages)
    return messages


def _dialogue(record: Record, key: str) -> list[dict[str, str]]:
    value = _required(record, key)
    if isinstance(value, str):
        return _transcript(record, key)
    return _messages(record, key)


def _required(record: Record, key: str) -> Any:
    if key not in record.fields:
        raise record.missing(key)
    return record.fields[key]


def _pair(record: Record, labelled: bool) -> PreferencePair:
    def pair(prompt: list[dict[str, str]], chosen: str | None, rejected: str | None) -> Any:
        return PreferencePair(prompt, chosen, rejected, record.file, record.line)

    if "prompt" in record.fields:
        value = record.fields["prompt"]
        if isinstance(value, str):
            prompt = [{"role": "user", "content": text_field(record, value, "prompt").strip()}]
        else:
            prompt = _messages(record, "prompt")
        if prompt[-1]["role"] != "user":
            raise record.error("the prompt must end with a user turn", "prompt")
        if not labelled and "chosen" not in record.fields:
            return pair(prompt, None, None)
        chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    else:
        chosen_turns, rejected_turns = _dialogue(record, "chosen"), _dialogue(record, "rejected")
        for key, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1]["role"] != "assistant" or not turns[-1]["content"]:
                raise record.error("the dialogue must end with an assistant reply", key)
        prompt = chosen_turns[:-1]
        if rejected_turns[:-1] != prompt:
            differ = next(
                (i for i, (a, b) in enumerate(zip(prompt, rejected_turns)) if a != b),
                min(len(prompt), len(rejected_turns) - 1),
            )
            raise record.error(
                f"the two dialogues differ before their last reply (at turn {differ}); a pair "
                "shares its prompt",
                "rejected",
            )
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if chosen == rejected:
        raise record.error("chosen and rejected are the same reply", "rejected")
    return pair(prompt, chosen, rejected)


def read_pairs(
    path: str | Path, fmt: str = "auto", labelled: bool = True, bad: BadRows | None = None
) -> list[PreferencePair]:
    """Read a json/jsonl/csv/Parquet file of preference pairs (see the module docstring).

    Unlabelled files may hold prompts alone (to be answered). Bad records go to `bad` (raised
    together at the end without one)."""
    with collect(str(path), bad) as bad:
        records = read_records(path, fmt, bad)
        return bad.keep(records, lambda r: _pair(r, labelled))


def looks_like_pairs(fields: dict[str, Any]) -> bool:
    """Whether a record's fields are a preference pair's (what `lmadapt auto` recognises)."""
    return "chosen" in fields and "rejected" in fields


__all__ = ["PreferencePair", "looks_like_pairs", "read_pairs"]
