"""Prompt templates: task description, input/output format, k demonstrations and the query.

A prompt is rendered as two strings, `prefix` and `suffix`: the prefix (system text, task
description, demonstrations) does not depend on the query, so its KV cache can be computed once and
reused for every query (see scoring.py); the suffix holds the query and the answer cue. With a
chat model the whole user turn is rendered through the tokenizer's chat template and the answer cue
opens the assistant turn. Label scoring continues the suffix with each verbalizer word.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lmadapt.errors import ConfigError
from lmadapt.schema import from_dict

TEMPLATE_DIR = Path(__file__).parent / "templates"
LABEL_SLOT = "{label}"
Demo = tuple[str, str]
"""A demonstration: (rendered input, rendered output with the answer)."""
_SPLIT = "\x00QUERY\x00"
"""Marks where the query starts inside a rendered chat prompt; never occurs in real text."""


@dataclass
class TemplateConfig:
    """How one prompt is laid out; `{field}` slots take record fields (text, text_pair, ...)."""

    instruction: str = ""
    """Task description opening the prompt (may be empty)."""
    input: str = "{text}"
    """Input format, e.g. "Review: {text}" or "Premise: {text}\\nHypothesis: {text_pair}"."""
    output: str = "{label}"
    """Output format; {label} is the verbalizer word (or the target text when generating).
    What precedes {label} is the answer cue ending every prompt, e.g. "Sentiment: {label}"."""
    system: str | None = None
    """System message for chat templates; None keeps the model's default."""
    chat: Literal["auto", "on", "off"] = "auto"
    """Render through the tokenizer's chat template: auto = when the tokenizer has one."""
    separator: str = "\n\n"
    """Between the instruction and each demonstration."""
    demo_style: Literal["inline", "turns"] = "inline"
    """Chat models only: all demonstrations inside the query's user message (inline), or each as
    its own user/assistant turn pair (turns). Neither won clearly for SmolLM2-135M on SST-2
    8-shot (see the prompting notes), so the one-message layout of the papers stays default."""

    def __post_init__(self) -> None:
        if self.output.count(LABEL_SLOT) != 1:
            raise ConfigError("template.output", f"must contain {LABEL_SLOT} exactly once")
        for name in ("instruction", "input", "output"):
            try:
                list(string.Formatter().parse(getattr(self, name)))
            except ValueError as e:
                raise ConfigError(f"template.{name}", f"bad format string: {e}") from None

    @property
    def cue(self) -> str:
        """The answer cue: output text before {label}, without trailing whitespace."""
        head = self.output.split(LABEL_SLOT)[0]
        return head.rstrip()

    def answer(self, word: str) -> str:
        """Continuation scored for a verbalizer word: the cue's trailing whitespace + word.

        BPE vocabularies attach a leading space to the word (" positive"), so the whitespace goes
        with the word rather than with the cue.
        """
        head = self.output.split(LABEL_SLOT)[0]
        return head[len(head.rstrip()) :] + word


def named_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def load_template(spec: str | dict[str, Any] | TemplateConfig) -> TemplateConfig:
    """A named template shipped with lmadapt, a YAML file path, or an inline mapping."""
    if isinstance(spec, TemplateConfig):
        return spec
    if isinstance(spec, str):
        path = TEMPLATE_DIR / f"{spec}.yaml"
        if not path.is_file():
            path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                "template", f"unknown template {spec!r}; named: {', '.join(named_templates())}"
            )
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        data.pop("verbalizer", None)  # named templates may suggest one; the prompt config owns it
        return from_dict(TemplateConfig, data, "template")
    return from_dict(TemplateConfig, spec, "template")


def template_verbalizer(name: str) -> dict[str, list[str]] | None:
    """The verbalizer suggested by a named template, if it has one."""
    path = TEMPLATE_DIR / f"{name}.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return data.get("verbalizer")


class _Fields(dict):
    """Format mapping whose missing keys name the template field that asked for them."""

    def __init__(self, fields: dict[str, Any], where: str):
        super().__init__(fields)
        self.where = where

    def __missing__(self, key: str) -> str:
        raise ConfigError(self.where, f"slot {{{key}}} has no value; fields: {', '.join(self)}")


def fill(fmt: str, fields: dict[str, Any], where: str) -> str:
    return fmt.format_map(_Fields({k: "" if v is None else v for k, v in fields.items()}, where))


class Renderer:
    """Renders (prefix, suffix) strings for a template, plain or through a chat template."""

    def __init__(self, template: TemplateConfig, tokenizer: Any):
        self.t = template
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template.chat == "on" and not has_chat:
            raise ConfigError("template.chat", "is 'on' but the tokenizer has no chat template")
        self.chat = has_chat and template.chat != "off"
        self.tokenizer = tokenizer

    def demo(self, fields: dict[str, Any], answer: str) -> Demo:
        """One demonstration: the input, and the output with its answer filled in."""
        inp = fill(self.t.input, fields, "template.input")
        out = self.t.output.replace(LABEL_SLOT, "\x01")
        return inp, fill(out, fields, "template.output").replace("\x01", answer)

    def render(self, demos: list[Demo], fields: dict[str, Any]) -> tuple[str, str]:
        """(prefix, suffix): the prefix is everything before the query's input block."""
        head = (
            [fill(self.t.instruction, fields, "template.instruction")] if self.t.instruction else []
        )
        query = fill(self.t.input, fields, "template.input")
        cue = fill(self.t.cue.replace(LABEL_SLOT, ""), fields, "template.output")
        turns = self.chat and self.t.demo_style == "turns"
        blocks = head + ([] if turns else [f"{i}\n{o}" for i, o in demos])
        prefix = "".join(b + self.t.separator for b in blocks)
        if not self.chat:
            return prefix, f"{query}\n{cue}"
        messages = [{"role": "system", "content": self.t.system}] if self.t.system else []
        if turns:
            for inp, out in demos:
                messages += [
                    {"role": "user", "content": prefix + inp},
                    {"role": "assistant", "content": out},
                ]
                prefix = ""  # the instruction opens the first user turn only
        messages.append({"role": "user", "content": prefix + _SPLIT + query})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(_SPLIT)
        return before, after + cue
