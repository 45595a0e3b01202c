"""Instruction and chat data: Alpaca, ShareGPT, OpenAI `messages`, and plain `text` records.

Every format becomes a `Conversation` (a list of role/content messages, or raw text for continued
pre-training), so templates and the loss see one shape. The format is told by the fields of the
first record that names one; every record is then held to it, and errors name file, line and
field (`messages[2].role`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmadapt.data.readers import Record, read_records
from lmadapt.data.validation import BadRows, collect
from lmadapt.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)
    """role/content dicts; system first if any, then user and assistant turns alternating."""
    text: str | None = None
    """Raw text (continued pre-training): trained on every token, no template."""
    file: str = ""
    line: int = 0

    @property
    def reference(self) -> str | None:
        """The last assistant turn: what generation is scored against."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The messages a model answers: everything before the last assistant turn."""
        return self.messages[:-1] if self.reference is not None else list(self.messages)


def text_field(record: Record, value: object, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise record.error(f"expected text, got {type(value).__name__} {value!r}", where)
    if not allow_empty and not value.strip():
        raise record.error("empty text", where)
    return value


def _required(record: Record, name: str) -> object:
    if name not in record.fields:
        raise record.error(
            f"missing field; fields present: {', '.join(map(str, record.fields))}", name
        )
    return record.fields[name]


def _alpaca(record: Record, labelled: bool) -> list[dict[str, str]]:
    instruction = text_field(record, _required(record, "instruction"), "instruction").strip()
    extra = text_field(record, record.fields.get("input") or "", "input", allow_empty=True).strip()
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": user}]
    if labelled or record.fields.get("output") is not None:
        output = text_field(record, _required(record, "output"), "output")
        messages.append({"role": "assistant", "content": output.strip()})
    return messages


def message_turns(
    record: Record, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    turns = _required(record, key)
    if not isinstance(turns, list) or not turns:
        raise record.error(f"expected a non-empty list of turns, got {turns!r}"[:200], key)
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise record.error(f"expected an object, got {type(turn).__name__}", where)
        if role_key not in turn:
            raise record.error("missing field", f"{where}.{role_key}")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise record.error(
                f"unknown role {turn[role_key]!r}; one of: {', '.join(roles)}",
                f"{where}.{role_key}",
            )
        if content_key not in turn:
            raise record.error("missing field", f"{where}.{content_key}")
        content = text_field(record, turn[content_key], f"{where}.{content_key}")
        messages.append({"role": role, "content": content.strip()})
    check_turn_order(record, key, role_key, messages)
    return messages


def check_turn_order(record: Record, key: str, role_key: str, messages: list[dict]) -> None:
    """System only first; then user, assistant, user, ... (what chat templates expect)."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise record.error(
                f"expected {'an' if expected == 'assistant' else 'a'} {expected} turn here, got "
                f"{m['role']} (system first, then user and "
                "assistant turns alternating)",
                f"{key}[{i}].{role_key}",
            )
    if len(messages) == start:
        raise record.error("no user turn", key)


def _sharegpt(record: Record, labelled: bool) -> list[dict[str, str]]:
    return message_turns(record, "conversations", "from", "value", SHAREGPT_ROLES)


def _openai(record: Record, labelled: bool) -> list[dict[str, str]]:
    return message_turns(record, "messages", "role", "content", {r: r for r in ROLES})


def _plain_text(record: Record, labelled: bool) -> str:
    return text_field(record, _required(record, "text"), "text")


Parser = Callable[[Record, bool], list[dict[str, str]] | str]
"""(record, labelled) -> role/content turns, or raw text."""

# name -> (field that identifies it, parser); checked in this order by `detect_chat_format`.
CHAT_FORMATS: dict[str, tuple[str, Parser]] = {
    "messages": ("messages", _openai),
    "sharegpt": ("conversations", _sharegpt),
    "alpaca": ("instruction", _alpaca),
    "text": ("text", _plain_text),
}


def detect_chat_format(record: Record) -> str:
    for name, (key, _) in CHAT_FORMATS.items():
        if key in record.fields:
            return name
    wanted = ", ".join(f"'{k}' ({n})" for n, (k, _) in CHAT_FORMATS.items())
    raise DataError(
        record.file,
        f"cannot tell the data format: expected a field {wanted}; "
        f"fields present: {', '.join(map(str, record.fields))}",
        record.line,
    )


def read_conversations(
    path: str | Path,
    fmt: str = "auto",
    data_format: str = "auto",
    labelled: bool = True,
    bad: BadRows | None = None,
) -> list[Conversation]:
    """Read a json/jsonl file of chat or instruction records into conversations.

    `labelled` conversations must end with an assistant turn (the training target / reference);
    unlabelled ones are prompts and must end with a user turn. Bad records go to `bad` (raised
    together at the end without one).
    """
    with collect(str(path), bad) as bad:
        records = read_records(path, fmt, bad)
        if data_format == "auto":
            # A bad first record should not hide the format the others are in.
            named = (r for r in records if any(key in r.fields for key, _ in CHAT_FORMATS.values()))
            data_format = detect_chat_format(next(named, records[0]))
        key, parse = CHAT_FORMATS[data_format]
        return bad.keep(records, lambda r: _conversation(r, key, parse, labelled))


def _conversation(r: Record, key: str, parse: Parser, labelled: bool) -> Conversation:
    parsed = parse(r, labelled)
    if isinstance(parsed, str):
        return Conversation(text=parsed, file=r.file, line=r.line)
    if labelled and parsed[-1]["role"] != "assistant":
        raise r.error("the conversation must end with an assistant turn (the target)", key)
    return Conversation(messages=parsed, file=r.file, line=r.line)
