"""`lmadapt export RUN --format gguf`: a causal-LM run as one GGUF file, for llama.cpp and Ollama.

The adapter is merged into the base weights as `export --merge` merges it (reparameterising
methods only; a quantised run's base is dequantised first), and a whole-model run (full, bitfit)
is written as it is. `model.gguf` holds the llama architecture's hyperparameters, the weights
under llama.cpp's tensor names, the byte-level BPE tokenizer and the chat template; an Ollama
`Modelfile` goes beside it, with the run's chat template in Ollama's Go-template form where it
can be converted exactly (ChatML-style templates and lmadapt's own markup templates), and
`lmadapt_export.json` records the checks.

Weights are stored F32. The file then holds exactly the merged weights, so the check below can
ask for the merged model's greedy tokens and logits equal within `TOLERANCE` (F32 round-trips
bit for bit). F16 would round every weight: measured max abs logit differences 1.9e-4 on the tiny
test Llama (logits within 0.53) and 3.8e-2 on SmolLM2-135M with a LoRA merged in (logits up to
42); its greedy tokens still matched there, but a near-tie between two tokens can flip a step,
and the check could then only be loose. The cost is 4 bytes a parameter (540 MB for
SmolLM2-135M); llama.cpp's `llama-quantize`, or `ollama create --quantize q8_0`, makes a smaller
copy from the file.

Checked before anything is kept: the file read back by transformers' GGUF loader (model and
tokenizer) must encode text as the run's tokenizer does, give the merged model's first
`NEW_TOKENS` greedy tokens on `PROMPTS` (each through the run's chat template) and its logits
within `TOLERANCE` on those sequences and on export's probe texts; otherwise nothing is written.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from lmadapt.api import LoadedRun, RunInfo, load_run, read_run
from lmadapt.data.templates import ChatTemplate, MarkupTemplate, full_so_far
from lmadapt.errors import LmadaptError
from lmadapt.export_common import PROBE_TEXTS, max_abs_diff, merged_model
from lmadapt.io import atomic_dir, write_json, write_text
from lmadapt.models import ModelSpec
from lmadapt.rundir import check_output_dir, mark
from lmadapt.session import resolve_device
from lmadapt.tasks.generation import GenerationTask

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
RESULT_FILE = "lmadapt_export.json"

TOLERANCE = 1e-4
"""Max abs logit difference between the file read back and the merged model. Both compute in fp32
on the CPU from the same weights, so they agree to the last bit (measured 0.0 on the tiny test
Llama and on SmolLM2-135M with a LoRA merged in); 1e-4 is `export --merge`'s bound, room for an
op order a future transformers may change, far below what a wrong tensor gives."""
MERGE_TOLERANCE = {"cpu": (1e-4, 1e-5), "accelerator": (1e-2, 1e-3)}
"""Merged vs unmerged logits, as `export --merge` checks them: (absolute, relative) bounds, the
larger applying, relative to the largest |logit| (rounding grows with it: SmolLM2's logits reach
42, and a 2-step LoRA merged into it differs by 5e-5 on the CPU). 1e-4 is `export --merge`'s CPU
default; on a GPU (TF32 or bf16 matmuls) 1e-2 is the bound its CUDA test uses."""
NEW_TOKENS = 20
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "what is 3 plus 4?",
    "List three colours.",
    "Explain in a few words what a neural network is.",
]
"""Each through the run's chat template, then `NEW_TOKENS` greedy tokens (no stopping)."""
TOKENIZER_TEXTS = [
    "Hello, world!  Two spaces, a tab\tand a newline\n.",
    "Numbers: 7, 42, 1234567 and 3.14159; prices $5.99.",
    "Accents and scripts: café, naïve, Straße, 東京, Привет, 🚀🦙.",
    "  leading and trailing spaces  ",
]
"""Besides the prompts and probe texts: the tokenizer read back must encode these alike too."""

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": " Another one,\nplease. "},
    ],
    [
        {"role": "system", "content": "Be brief.\n"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": " b "},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d\n\ne"},
        {"role": "user", "content": "f"},
    ],
]
"""A converted template must render each of these (with the generation prompt) exactly as the
run's template does: system prompt given or not, multi-turn, contents with edge whitespace."""

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------- chat templates


@dataclass(frozen=True)
class Turns:
    """A chat template that is fixed text around each message's content: what Ollama's Go
    template and a Jinja template can both say exactly.

    Rendered as Ollama renders the Go template of `go_template`: the Modelfile's SYSTEM (here
    `default_system`) first when the conversation has no system message, each message as
    prefix + content + suffix, and the generation prompt after a last message not the
    assistant's."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None = None
    role_markup: tuple[str, str] | None = None
    """(before, after) the role name when every role's prefix is before + role + after and the
    suffixes are one: the Go template then writes any role (tool included) the same way."""

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        msgs = list(messages)
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in msgs)
        return text + (self.generation if msgs and msgs[-1]["role"] != "assistant" else "")

    def go_template(self) -> str:
        """Ollama's TEMPLATE: one line of actions, so the markup's own newlines are its only
        whitespace (no `{{-` trimming to eat into it)."""
        if self.role_markup is not None:
            before, after = self.role_markup
            body = before + _act(".Role") + after + _act(".Content") + self.suffix["user"]
        else:
            body = "".join(
                _act(f'{"if" if i == 0 else "else if"} eq .Role "{role}"')
                + self.prefix[role]
                + _act(".Content")
                + self.suffix[role]
                for i, role in enumerate(ROLES)
            ) + _act("end")
        return (
            _act("range $i, $_ := .Messages")
            + _act("$last := eq (len (slice $.Messages $i)) 1")
            + body
            + _act('if and $last (ne .Role "assistant")')
            + self.generation
            + _act("end")
            + _act("end")
        )

    def jinja_template(self) -> str:
        """The same markup as a Jinja chat template (for the GGUF file, where the tokenizer has
        none): every literal a Jinja string, so no template whitespace control applies."""
        q = json.dumps
        parts: list[str] = []
        if self.default_system is not None:
            text = self.prefix["system"] + self.default_system + self.suffix["system"]
            parts.append(
                "{% if not messages or messages[0]['role'] != 'system' %}"
                f"{{{{ {q(text)} }}}}{{% endif %}}"
            )
        parts.append("{% for message in messages %}")
        for i, role in enumerate(ROLES):
            parts.append(
                f"{{% {'if' if i == 0 else 'elif'} message['role'] == {q(role)} %}}"
                f"{{{{ {q(self.prefix[role])} + message['content'] + {q(self.suffix[role])} }}}}"
            )
        parts.append("{% endif %}{% endfor %}")
        parts.append(f"{{% if add_generation_prompt %}}{{{{ {q(self.generation)} }}}}{{% endif %}}")
        return "".join(parts)

    def stops(self) -> list[str]:
        """Where an answer ends: the assistant's end marker, and the marker opening a turn."""
        opener = self.role_markup[0] if self.role_markup else self.prefix["user"]
        return [s for s in (self.suffix["assistant"].strip(), opener.strip()) if s]


def _act(action: str) -> str:
    return "{{ " + action + " }}"


CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


def chatml_turns(default_system: str | None = None) -> Turns:
    return Turns(
        prefix={r: f"{CHATML_START}{r}\n" for r in ROLES},
        suffix={r: f"{CHATML_END}\n" for r in ROLES},
        generation=f"{CHATML_START}assistant\n",
        default_system=default_system,
        role_markup=(CHATML_START, "\n"),
    )


def _markup_turns(template: MarkupTemplate) -> Turns | None:
    """lmadapt's own markup templates (alpaca, chatml, plain) from their format strings."""
    split: dict[str, tuple[str, str]] = {}
    for role in ("system", "user"):
        text = getattr(template, role).format(content="\0")
        if text.count("\0") != 1:
            return None
        before, _, after = text.partition("\0")
        split[role] = (before, after)
    header = template.assistant_header
    prefix = {"system": split["system"][0], "user": split["user"][0], "assistant": header}
    suffix = {
        "system": split["system"][1],
        "user": split["user"][1],
        "assistant": template.assistant_end.format(eos=template.eos) + template.separator,
    }
    markup = None  # chatml's: one opener around any role, one closer
    before, found, after = prefix["user"].partition("user")
    if (
        found
        and all(prefix[r] == before + r + after for r in ROLES)
        and len(set(suffix.values())) == 1
    ):
        markup = (before, after)
    return Turns(prefix, suffix, header, template.default_system or None, markup)


def _chatml_guess(template: ChatTemplate) -> Turns:
    """ChatML, with the default system prompt the template writes when it is given none (as
    SmolLM2's does); whether the guess holds is for `convert_template` to check."""
    text = _render(template, [{"role": "user", "content": "x"}])
    head = f"{CHATML_START}system\n"
    end = text.find(f"{CHATML_END}\n")
    default = text[len(head) : end] if text.startswith(head) and end >= 0 else None
    return chatml_turns(default)


def _render(template: Any, messages: list[dict[str, str]]) -> str:
    """What lmadapt feeds the model for `messages`, generation prompt included."""
    return full_so_far(template.segments(messages, add_generation_prompt=True))


@dataclass
class ChatConversion:
    """The run's chat template for llama.cpp (Jinja, in the GGUF file) and Ollama (Go)."""

    source: str
    """The run's template name: chat (the tokenizer's own), chatml, alpaca or plain."""
    turns: Turns | None
    """None: not converted to Ollama's form (see `note`)."""
    jinja: str | None
    """For tokenizer.chat_template: the tokenizer's own, or one written from the markup."""
    note: str

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ollama_converted": self.turns is not None,
            "checked_conversations": len(CONVERSATIONS) if self.turns else 0,
            "default_system": self.turns.default_system if self.turns else None,
            "gguf_chat_template": self.jinja is not None,
            "note": self.note,
        }


def convert_template(template: Any, tokenizer: Any) -> ChatConversion:
    """The run's template as Turns, kept only when it renders every one of `CONVERSATIONS`
    exactly as the run's template does (as Ollama would, SYSTEM included)."""
    name = getattr(template, "name", type(template).__name__)
    own = getattr(tokenizer, "chat_template", None)
    turns: Turns | None = None
    form, why = name, f"lmadapt converts ChatML-style and its own markup templates, not '{name}'"
    try:
        if isinstance(template, MarkupTemplate):
            turns, form = _markup_turns(template), f"lmadapt's {name} markup"
            why = "a format string does not hold its content exactly once"
        elif isinstance(template, ChatTemplate):
            turns, form = _chatml_guess(template), "ChatML"
        if turns is not None:
            bad = [c for c in CONVERSATIONS if _render(template, c) != turns.render(c)]
            if bad:
                why = (
                    f"it is not {form} text around each message (a {len(bad[0])}-message "
                    "conversation renders differently)"
                )
                turns = None
    except Exception as e:  # a template that fails on a test conversation is not converted
        turns, why = None, f"rendering a test conversation failed ({e})"
    if turns is not None:
        literals = [*turns.prefix.values(), *turns.suffix.values(), turns.generation]
        literals.append(turns.default_system or "")
        if any(s in text for text in literals for s in ("{{", "}}", '"""')):
            turns, why = None, "its markup holds '{{', '}}' or '\"\"\"', which a Modelfile cannot"
    jinja = own if isinstance(own, str) and name == "chat" else None
    if jinja is None and turns is not None:
        written = turns.jinja_template()
        try:
            ok = all(
                tokenizer.apply_chat_template(
                    c, chat_template=written, tokenize=False, add_generation_prompt=True
                )
                == _render(template, c)
                for c in CONVERSATIONS
            )
        except Exception:  # then the file goes without a chat template, as the run's had none
            ok = False
        jinja = written if ok else None
    if turns is None:
        note = (
            f"the run's '{name}' template could not be converted to Ollama's template language "
            f"faithfully: {why}. Ollama picks a template for the GGUF file's "
            "tokenizer.chat_template if it recognises one: check `ollama show --template`"
        )
    else:
        note = (
            f"converted from the run's '{name}' template ({form}); renders "
            f"{len(CONVERSATIONS)} test conversations exactly as lmadapt does"
        )
    return ChatConversion(name, turns, jinja, note)


# ---------------------------------------------------------------------- tokenizer


@dataclass
class Vocab:
    """The tokenizer as llama.cpp's `gpt2` (byte-level BPE) vocabulary describes it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    eot: int | None
    add_bos: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "model": "gpt2",
            "pre": self.pre,
            "tokens": len(self.tokens),
            "merges": len(self.merges),
            "bos_id": self.bos,
            "eos_id": self.eos,
            "pad_id": self.pad,
            "eot_id": self.eot,
            "add_bos": self.add_bos,
            "notes": self.notes,
        }


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level pre-tokenizer, if it has one."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm" if last.get("use_regex", True) else None
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        try:  # transformers' own table of llama.cpp's names for split regexes
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS,
            )
        except ImportError:
            return None
        return next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex), None)
    return None


def _base_gguf_vocab(spec: ModelSpec) -> dict[str, Any]:
    """The base model's GGUF vocabulary as llama.cpp's converter wrote it (empty: no GGUF)."""
    if not spec.gguf_file:
        return {}
    import gguf

    try:
        reader = gguf.GGUFReader(Path(spec.path) / spec.gguf_file)
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for key, name in (
        ("tokenizer.ggml.pre", "pre"),
        ("tokenizer.ggml.tokens", "tokens"),
        ("tokenizer.ggml.token_type", "types"),
    ):
        f = reader.get_field(key)
        if f is not None:
            out[name] = f.contents()
    return out


def build_vocab(
    tokenizer: Any, n_vocab: int, spec: ModelSpec, eot: str | None, add_bos: bool
) -> Vocab:
    """The run's tokenizer as a llama.cpp vocabulary, as convert_hf_to_gguf.py's `gpt2` path
    makes it: tokens by id (padded to the model's embedding rows with [PADn], unused), added
    special tokens CONTROL and other added tokens USER_DEFINED, merges, special ids. Refuses
    tokenizers llama.cpp would split text differently from (not byte-level BPE, or a
    pre-tokenizer it has no name for).

    `add_bos`: whether lmadapt starts a prompt with BOS (its markup templates do when the
    tokenizer does; a chat template writes its own). llama.cpp adds BOS to the rendered prompt by
    this flag, so it then sees the tokens lmadapt fed the model; EOS it never adds."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    decoder = (backend.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise LmadaptError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) only; this "
            f"run's tokenizer is a {model.get('type')} one with a {decoder} decoder"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise LmadaptError(
            f"the tokenizer has token id {max(by_id)} but the model's embedding only {n_vocab} rows"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(token)
            kind = TokenType.NORMAL
            if i in added:
                kind = TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
            types.append(kind)
    merges = [
        m
        if isinstance(m, str)
        else " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in m)
        for m in model.get("merges") or []
    ]
    notes: list[str] = []
    pre = _pre_name(backend.get("pre_tokenizer"))
    base = _base_gguf_vocab(spec)
    if base.get("tokens") == tokens:
        # the run's vocabulary is its base GGUF file's: keep what llama.cpp's converter wrote
        # there (transformers reads a pre-tokenizer name it has no regex for, as "smollm", as
        # GPT-2's split, so the run's tokenizer no longer says which llama.cpp wants)
        if base.get("pre") and base["pre"] != pre:
            notes.append(f"pre-tokenizer '{base['pre']}' kept from the base GGUF file")
            pre = base["pre"]
        if base.get("types") is not None and [int(t) for t in base["types"]] != types:
            notes.append("token types kept from the base GGUF file")
            types = [int(t) for t in base["types"]]
    elif base:
        notes.append("the run's vocabulary differs from the base GGUF file's")
    if pre is None or backend.get("normalizer"):
        what = backend.get("pre_tokenizer") if pre is None else backend.get("normalizer")
        raise LmadaptError(
            f"the tokenizer's pre-tokenizer or normalizer ({json.dumps(what)[:200]}) has no "
            "llama.cpp equivalent that lmadapt knows (gpt-2, smollm, or a split regex llama.cpp "
            "names), so llama.cpp would split text differently from the run"
        )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    eot_id = None
    if eot:
        ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] != eos and types[ids[0]] == TokenType.CONTROL:
            eot_id = ids[0]
    return Vocab(
        tokens, types, merges, pre, bos, eos, tokenizer.pad_token_id, eot_id, add_bos, notes,
    )  # fmt: skip


# ---------------------------------------------------------------------- weights


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's row order for a q or k projection (convert_hf_to_gguf.py, LlamaModel.permute):
    within each head, HF's rotary layout (first half, second half) becomes llama.cpp's
    interleaved pairs. transformers' GGUF loader undoes it (LlamaTensorProcessor)."""
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _rope(config: Any) -> tuple[str, float]:
    """(rope type, base frequency) from transformers 5's rope_parameters or the older fields."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return str(kind), float(theta if theta is not None else 10000.0)


def check_exportable(info: RunInfo) -> None:
    """Refuse, before any weight loads, a run with no plain weights to write (a method that
    cannot be merged) or that is not a causal LM."""
    method = info.method
    if not (method.mergeable or method.saves_whole_model):
        raise LmadaptError(
            f"method '{info.config.method.name}' cannot be merged into the base weights, so "
            "there are no plain weights to write as GGUF; only reparameterising methods (lora, "
            "adalora, ia3) and whole-model ones (full, bitfit) export"
        )
    if not isinstance(info.task, GenerationTask) or info.spec.kind != "causal":
        raise LmadaptError(
            "GGUF export is for causal language models (task generation or preference); this "
            f"run is a {info.task.kind} run on a {info.spec.kind} model"
        )


def check_architecture(config: Any) -> None:
    """Refuse, naming it, what the llama mapping does not cover."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise LmadaptError(
            "GGUF export maps the llama architecture only (SmolLM2, TinyLlama, Llama 2/3); "
            f"this run's model is '{model_type}'"
        )
    unmapped = []
    if getattr(config, "hidden_act", "silu") != "silu":
        unmapped.append(f"activation '{config.hidden_act}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        unmapped.append("bias terms")
    kind, _ = _rope(config)
    if kind != "default":
        unmapped.append(f"rope scaling '{kind}'")
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        unmapped.append("a partial rotary embedding")
    if unmapped:
        raise LmadaptError(
            f"this llama model has {', '.join(unmapped)}, which lmadapt's GGUF export does not map"
        )


def gguf_tensors(model: Any) -> tuple[list[tuple[str, np.ndarray]], bool]:
    """(GGUF name, fp32 array) for every weight, named by gguf's llama tensor map, and whether
    the LM head is the embedding (then no `output.weight`, as llama.cpp writes tied models)."""
    import gguf

    config = model.config
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    state = model.state_dict()
    embed, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    tied = head is None or (embed is not None and torch.equal(head, embed))
    out: list[tuple[str, np.ndarray]] = []
    unmapped = []
    for key, tensor in state.items():
        if (key == "lm_head.weight" and tied) or key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(key)
            continue
        data = tensor.detach().to("cpu", torch.float32)
        if key.endswith("self_attn.q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        out.append((name, data.contiguous().numpy()))
    if unmapped:
        raise LmadaptError(
            f"weights with no llama.cpp name: {', '.join(unmapped[:5])}"
            + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        )
    return out, tied


def write_gguf(
    path: Path,
    config: Any,
    tensors: list[tuple[str, np.ndarray]],
    vocab: Vocab,
    chat_template: str | None,
    title: str,
) -> None:
    """The file, with the keys llama.cpp's llama loader reads (as convert_hf_to_gguf.py writes
    them for LlamaForCausalLM)."""
    import gguf

    n_head = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        w.add_name(title)
        w.add_context_length(int(config.max_position_embeddings))
        w.add_embedding_length(hidden)
        w.add_block_count(int(config.num_hidden_layers))
        w.add_feed_forward_length(int(config.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(_rope(config)[1])
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_vocab_size(len(vocab.tokens))
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        for value, add in (
            (vocab.bos, w.add_bos_token_id),
            (vocab.eos, w.add_eos_token_id),
            (vocab.pad, w.add_pad_token_id),
            (vocab.eot, w.add_eot_token_id),
        ):
            if value is not None:
                add(value)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
        for name, data in tensors:
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


# ---------------------------------------------------------------------- checks


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    weight = next(model.parameters())
    out = model(input_ids=torch.tensor([ids], device=weight.device), use_cache=False)
    return cast(torch.Tensor, out.logits[0]).float().cpu()


@torch.no_grad()
def greedy(model: Any, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """The first `n` greedy tokens after `ids` (no end token stops it), one sequence, no
    padding: what both models are compared on."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    new: list[int] = []
    while True:
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if len(new) == n:
            return new
        out = model(
            input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
        )


@dataclass
class Reference:
    """What the file read back is checked against: the merged model's outputs, fp32, CPU."""

    prompt_texts: list[str]
    prompt_ids: list[list[int]]
    continuations: list[list[int]]
    sequences: list[list[int]]
    logits: list[torch.Tensor]

    def greedy_summary(self, tokenizer: Any) -> dict[str, Any]:
        """The greedy check for result.json: every prompt matched (or the export failed)."""
        samples = [
            {"prompt": p, "continuation": tokenizer.decode(c)}
            for p, c in zip(PROMPTS, self.continuations)
        ]
        return {
            "prompts": len(PROMPTS),
            "new_tokens": NEW_TOKENS,
            "matched": len(PROMPTS),
            "samples": samples,
        }


def _merge(
    run: LoadedRun, method: Any, run_dir: str | Path, device: str
) -> tuple[Any, float, float]:
    """(model with the adapter folded in, merged-vs-unmerged max abs logit diff, its bound), as
    `export_merged` merges; a whole-model run's model as it is."""
    if method.saves_whole_model:
        return run.model, 0.0, 0.0
    probe = [run.tokenizer(t)["input_ids"] for t in [*PROMPTS, *PROBE_TEXTS]]
    unmerged = [_logits(run.model, ids) for ids in probe]
    where = resolve_device(device)
    merged = merged_model(run, run_dir, device)  # as export --merge merges
    diff = max(max_abs_diff(_logits(merged, ids), u) for ids, u in zip(probe, unmerged))
    absolute, relative = MERGE_TOLERANCE["cpu" if where.type == "cpu" else "accelerator"]
    bound = max(absolute, relative * max(float(u.abs().max()) for u in unmerged))
    if not diff <= bound:
        raise LmadaptError(
            f"merged logits differ from the unmerged model's by {diff:.3g} (tolerance "
            f"{bound:g}); nothing was written"
        )
    return merged, diff, bound


def _reference(model: Any, task: GenerationTask, tokenizer: Any) -> Reference:
    convs = task.examples_from_texts(PROMPTS)
    template = task.template(tokenizer)
    feats = task.encode(convs, tokenizer)
    ids = [list(task.prompt_ids(f, c)) for f, c in zip(feats, convs)]
    texts = [full_so_far(task.segments(c, template)) for c in convs]
    continuations = [greedy(model, p) for p in ids]
    probes = [tokenizer(t)["input_ids"] for t in PROBE_TEXTS]
    sequences = [p + c for p, c in zip(ids, continuations)] + probes
    return Reference(texts, ids, continuations, sequences, [_logits(model, s) for s in sequences])


def _read_back(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=GGUF_FILE)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF_FILE)
    except Exception as e:  # any failure to read our own file is the export's to report
        raise LmadaptError(
            f"the written GGUF file could not be read back by transformers ({e}); nothing was "
            "written"
        ) from e
    return model.eval(), tokenizer


def _check_tokenizer(run_tok: Any, gguf_tok: Any, ref: Reference) -> int:
    """Refuse unless the tokenizer read back encodes and decodes as the run's; returns how many
    texts were compared."""
    specials = "".join(getattr(run_tok, "all_special_tokens", []))
    texts = [*ref.prompt_texts, *PROBE_TEXTS, *TOKENIZER_TEXTS, f"a{specials}b"]
    for text in texts:  # the text's own tokens: BOS is the prompt's (see build_vocab)
        want = run_tok(text, add_special_tokens=False)["input_ids"]
        got = gguf_tok(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise LmadaptError(
                f"the tokenizer read back from the GGUF file encodes {text[:60]!r} as {got[:12]} "
                f"where the run's gives {want[:12]}; nothing was written"
            )
    raw = {"clean_up_tokenization_spaces": False}  # as llama.cpp detokenizes: no clean-up
    for ids in ref.sequences:
        if run_tok.decode(ids, **raw) != gguf_tok.decode(ids, **raw):
            raise LmadaptError(
                "the tokenizer read back from the GGUF file decodes tokens differently from the "
                "run's; nothing was written"
            )
    return len(texts)


# ---------------------------------------------------------------------- Modelfile


def _quoted(text: str) -> str | None:
    return f'"{text}"' if text and '"' not in text and "\n" not in text else None


def modelfile(chat: ChatConversion, stops: list[str], settings: Any, about: str) -> str:
    lines = [
        f"# Ollama Modelfile written by lmadapt: {about}",
        f"# Create the model: ollama create NAME -f {MODELFILE}",
        f"# (llama.cpp reads {GGUF_FILE} alone: llama-cli -m {GGUF_FILE}, chat template inside)",
        f"# Chat template: {chat.note}",
        f"FROM ./{GGUF_FILE}",
    ]
    if chat.turns is not None:
        lines.append(f'TEMPLATE """{chat.turns.go_template()}"""')
        if chat.turns.default_system is not None:
            lines.append(f'SYSTEM """{chat.turns.default_system}"""')
    for stop in stops:
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    if settings.do_sample:
        lines.append(f"PARAMETER temperature {settings.temperature:g}")
        lines.append(f"PARAMETER top_p {settings.top_p:g}")
    else:
        lines.append("# greedy decoding, as the run's task decodes: no sampling, no repeat penalty")
        lines.append("PARAMETER temperature 0")
        lines.append("PARAMETER repeat_penalty 1")
    return "\n".join(lines) + "\n"


def _stops(chat: ChatConversion, template: Any, settings: Any, tokenizer: Any) -> list[str]:
    found = [
        *(chat.turns.stops() if chat.turns else []),
        *getattr(template, "stop", ()),
        *settings.stop,
        tokenizer.eos_token or "",
    ]
    return [s for s in dict.fromkeys(found) if _quoted(s)]


# ---------------------------------------------------------------------- export


def _check_outputs(gguf_model: Any, tokenizer: Any, ref: Reference) -> float:
    """The largest logit difference between the file read back and the merged model; raises
    when it exceeds `TOLERANCE` or a greedy continuation differs."""
    diff = max(max_abs_diff(_logits(gguf_model, s), r) for s, r in zip(ref.sequences, ref.logits))
    if not diff <= TOLERANCE:
        raise LmadaptError(
            f"the GGUF file's logits (read back by transformers) differ from the merged "
            f"model's by {diff:.3g} (tolerance {TOLERANCE:g}); nothing was written"
        )
    for prompt, ids, want in zip(PROMPTS, ref.prompt_ids, ref.continuations):
        got = greedy(gguf_model, ids)
        if got != want:
            raise LmadaptError(
                f"the GGUF file's greedy continuation of {prompt!r} differs from the merged "
                f"model's ({tokenizer.decode(got)!r} vs {tokenizer.decode(want)!r}); nothing "
                "was written"
            )
    return diff


def export_gguf(
    run_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Write the run as `out_dir/model.gguf` with an Ollama `Modelfile` (atomically).

    Raises LmadaptError (exit code 2), writing nothing, when the method cannot be merged, the
    run is not a causal LM of the llama architecture, its tokenizer has no llama.cpp form, or the
    file read back by transformers differs from the merged model (tokens, greedy continuations,
    logits beyond `TOLERANCE`). The merge runs on `device`; the checks run in fp32 on the CPU.
    """
    out = check_output_dir(
        out_dir, overwrite, "--out", "--overwrite", "--overwrite", inputs={"RUN": run_dir}
    )
    info = read_run(run_dir)
    check_exportable(info)
    method_name = info.config.method.name
    run = load_run(run_dir, device)
    task, tokenizer, spec = cast(GenerationTask, run.task), run.tokenizer, run.spec
    config = cast(Any, run.model).config
    check_architecture(config)
    template = task.template(tokenizer)
    settings = task.settings()
    chat = convert_template(template, tokenizer)
    eot = chat.turns.suffix["assistant"].strip() if chat.turns else None
    adds_bos = bool(task._bos(tokenizer, template))  # as lmadapt starts a prompt
    vocab = build_vocab(tokenizer, int(config.vocab_size), spec, eot, adds_bos)
    merged, diff_merged, merge_bound = _merge(run, info.method, run_dir, device)
    del run
    # fp32 on the CPU, as the file stores it and the checks compute; nn.Module's own `to`,
    # since transformers refuses a model loaded from GGUF (its "quantizer") a dtype change
    model = torch.nn.Module.to(merged, "cpu", torch.float32).eval()
    del merged
    ref = _reference(model, task, tokenizer)
    tensors, tied = gguf_tensors(model)
    about = f"{method_name} fine-tune of {spec.name} (run {Path(run_dir).resolve().name})"
    with atomic_dir(out) as tmp:
        mark(tmp, "export")
        write_gguf(tmp / GGUF_FILE, model.config, tensors, vocab, chat.jinja, about)
        n_tensors = len(tensors)
        del tensors, model
        gc.collect()
        gguf_model, gguf_tok = _read_back(tmp)
        texts = _check_tokenizer(tokenizer, gguf_tok, ref)
        diff = _check_outputs(gguf_model, tokenizer, ref)
        stops = _stops(chat, template, settings, tokenizer)
        write_text(tmp / MODELFILE, modelfile(chat, stops, settings, about))
        prompts_as_lmadapt = sum(
            gguf_tok(t)["input_ids"] == ids for t, ids in zip(ref.prompt_texts, ref.prompt_ids)
        )
        result = {
            "source_run": str(Path(run_dir).resolve()),
            "method": method_name,
            "model": spec.name,
            "format": "gguf",
            "gguf_file": GGUF_FILE,
            "architecture": "llama",
            "file_type": "F32",
            "size_bytes": (tmp / GGUF_FILE).stat().st_size,
            "tensors": n_tensors,
            "tied_embeddings": tied,
            "max_abs_diff": diff,
            "tolerance": TOLERANCE,
            "max_abs_diff_merged": diff_merged,
            "merge_tolerance": merge_bound,
            "greedy": ref.greedy_summary(tokenizer),
            "probe_sequences": len(ref.sequences),
            "tokenizer": {
                **vocab.summary(),
                "texts_compared": texts,
                "prompts_tokenized_as_lmadapt": prompts_as_lmadapt,
            },
            "chat_template": {**chat.summary(), "stops": stops},
        }
        write_json(tmp / RESULT_FILE, result)
    return {"out_dir": str(out), **result}
