"""Prompt templates: a conversation -> text segments, each marked trained (response) or not.

Templates render segments rather than one string so the response mask is exact by construction:
each segment is tokenized on its own and the token ids concatenated. The same segments, cut before
the last response, are the generation prompt, so a model is prompted with exactly the tokens it
was trained on. `chat` uses the tokenizer's own chat template; `alpaca`, `chatml` and `plain` are
for tokenizers without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmadapt.errors import LmadaptError
from lmadapt.registry import Registry


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool
    """True for response text (assistant content and its end marker)."""


TEMPLATES: Registry = Registry("prompt template")


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind and drop empty ones (fewer, longer tokenizer calls)."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        if out and out[-1].train == s.train:
            out[-1] = Segment(out[-1].text + s.text, s.train)
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class MarkupTemplate:
    """A template given by a few format strings; `{eos}` is the tokenizer's end-of-text token."""

    name: str
    system: str
    user: str
    assistant_header: str
    """Opens an assistant turn; also the generation prompt. Not trained."""
    assistant_end: str
    """Closes an assistant turn; trained, so the model learns to stop."""
    separator: str
    """Between an assistant turn and the next turn; not trained."""
    eos: str
    default_system: str | None = None
    stop: tuple[str, ...] = ()

    def segments(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> list[Segment]:
        out: list[Segment] = []
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            out.append(Segment(self.system.format(content=self.default_system), False))
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "assistant":
                out.append(Segment(self.assistant_header, False))
                out.append(Segment(content + self.assistant_end.format(eos=self.eos), True))
                out.append(Segment(self.separator, False))
            else:
                out.append(Segment(getattr(self, role).format(content=content), False))
        if add_generation_prompt:
            out.append(Segment(self.assistant_header, False))
        elif out and out[-1].text == self.separator:
            out.pop()  # nothing follows the last answer
        return _merge(out)


def markup(name: str, summary: str, **fields: Any) -> None:
    """Register a markup template given by its format strings; the tokenizer it is built for
    supplies the end-of-text token."""

    def build(tokenizer: Any) -> MarkupTemplate:
        return MarkupTemplate(name, eos=tokenizer.eos_token or "", **fields)

    TEMPLATES.register(name, summary=summary)(build)


markup(
    "alpaca",
    "### Instruction: / ### Response: (Stanford Alpaca)",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant_header="### Response:\n",
    assistant_end="{eos}",
    separator="\n\n",
    default_system="Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    stop=("### Instruction:",),
)
markup(
    "chatml",
    "<|im_start|>role ... <|im_end|> (ChatML)",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    separator="\n",
    stop=("<|im_end|>",),
)
markup(
    "plain",
    "prompt, newline, response, end-of-text; no markup",
    system="{content}\n\n",
    user="{content}\n",
    assistant_header="",
    assistant_end="{eos}",
    separator="\n",
)


def full_so_far(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own (Jinja) chat template.

    Response spans are found by rendering growing prefixes of the conversation: the text a prefix
    ending in a user turn renders to (with the generation prompt) must be a prefix of the text
    with the answer added. Templates that rewrite earlier turns break that and are refused.
    """

    tokenizer: Any
    name: str = "chat"
    stop: tuple[str, ...] = ()

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> list[Segment]:
        out: list[Segment] = []
        done = 0  # characters of the final text already assigned to segments
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[: i + 1], False)
            if not full.startswith(prompt) or not prompt.startswith(full_so_far(out)):
                raise LmadaptError(
                    "the tokenizer's chat template re-renders earlier turns, so response tokens "
                    "cannot be located; set task.template to chatml, alpaca or plain"
                )
            end = self._answer_end(full, prompt, m["content"])
            out += [Segment(prompt[done:], False), Segment(full[len(prompt) : end], True)]
            done = end
        final = self._render(messages, add_generation_prompt)
        if not final.startswith(full_so_far(out)):
            raise LmadaptError(
                "the tokenizer's chat template renders a conversation differently from its "
                "prefixes; set task.template to chatml, alpaca or plain"
            )
        out.append(Segment(final[done:], False))
        return _merge(out)

    def _answer_end(self, full: str, prompt: str, content: str) -> int:
        """End of the trained span: the answer and the end-of-turn marker, not the whitespace
        a template puts between turns (the model need not learn to emit it)."""
        stripped = full.rstrip()
        return max(len(stripped), len(prompt) + len(content))


@TEMPLATES.register("chat", summary="the tokenizer's own chat template")
def _chat(tokenizer: Any) -> ChatTemplate:
    if not getattr(tokenizer, "chat_template", None):
        raise LmadaptError("task.template=chat but this tokenizer has no chat template")
    return ChatTemplate(tokenizer)


def resolve_template(name: str, tokenizer: Any) -> str:
    """`auto`: the tokenizer's chat template when it has one, else alpaca."""
    if name != "auto":
        return name
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def build_template(name: str, tokenizer: Any) -> Any:
    return TEMPLATES.get(resolve_template(name, tokenizer)).impl(tokenizer)
