"""Per-word attributions of one model output, independent of any task.

A task says what to explain (`Explainable`: one encoded input, its words, and one `Target` per
output to explain: a label's log-probability, an entity's tag logits); this module attributes
each target to the input's words, with captum:

- `ig`: Integrated Gradients (Sundararajan et al. 2017, arXiv:1703.01365) over the output of the
  model's input embedding layer, from a baseline where every word piece is the pad token (special
  tokens kept). Piece attributions are summed into words; completeness makes the word scores add
  up to f(input) - f(baseline), up to the reported convergence `delta`.
- `occlusion`: leave one word out (all of its pieces set to pad at once) and report the drop of
  the target, f(input) - f(input without the word).

Runs with gradients on even when called under `torch.no_grad`/`inference_mode` (a server).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from lmadapt.inference import on_model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Method = Literal["ig", "occlusion"]
METHODS: tuple[str, ...] = ("ig", "occlusion")


@dataclass
class Target:
    """One scalar of the model's output to explain, and how the output names it."""

    about: dict[str, Any]
    """What is explained, as the JSON output names it, e.g. {"label": "pos"}."""
    probability: float | None
    """The model's probability for it on the unchanged input (None where it has none)."""
    score: Callable[[torch.Tensor], torch.Tensor]
    """The model's logits (B, ...) -> the scalar explained, (B,)."""


@dataclass
class Explainable:
    """One input as the model sees it, the words it came from, and what to explain in it."""

    text: str
    input_ids: list[int]
    words: list[dict[str, Any]]
    """{word, start, end} with character offsets (end exclusive) into `text` (or into the field
    named by an "in" key, e.g. a pair's second text)."""
    word_ids: list[int | None]
    """Per input position: the index of its word in `words`; None for special tokens."""
    targets: list[Target]
    extra_inputs: dict[str, list[int]] = field(default_factory=dict)
    """Other forward arguments of the same length, e.g. token_type_ids."""
    fields: dict[str, Any] = field(default_factory=dict)
    """More of the example for the output, e.g. {"text_pair": ...}."""


def explain(
    model: torch.nn.Module,
    item: Explainable,
    method: Method = "ig",
    steps: int = 32,
    pad_id: int = 0,
    internal_batch_size: int = 16,
) -> dict[str, Any]:
    """{text, method, explanations: [{...about, probability, words: [{word, start, end, score}],
    delta (ig)}]}: every target of `item` attributed to its words."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; expected one of {METHODS}")
    layer = cast("PreTrainedModel", model).get_input_embeddings()  # a transformers model (or peft)
    forward_model = on_model_device(model)
    ids = torch.tensor([item.input_ids])  # (1, T)
    keys = ["attention_mask", *item.extra_inputs]
    extra = (torch.ones_like(ids), *(torch.tensor([v]) for v in item.extra_inputs.values()))
    # Baseline: every word piece is pad; special tokens ([CLS], [SEP], BOS) stay as they are.
    baseline = ids.clone()
    pieces = torch.tensor([[w is not None for w in item.word_ids]])
    baseline[pieces] = pad_id
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        for target in item.targets:
            forward = _scalar(forward_model, keys, target.score)
            row: dict[str, Any] = {**target.about, "probability": target.probability}
            if method == "ig":
                from captum.attr import LayerIntegratedGradients

                attr, delta = LayerIntegratedGradients(forward, layer).attribute(
                    ids,
                    baselines=baseline,
                    additional_forward_args=extra,
                    n_steps=steps,
                    internal_batch_size=internal_batch_size,
                    return_convergence_delta=True,
                )
                per_piece = attr.sum(-1)[0].detach().cpu()  # (T,): summed over the hidden size
                scores = _sum_by_word(per_piece, item.word_ids, len(item.words))
                row["delta"] = round(float(delta), 6)
            else:
                from captum.attr import FeatureAblation

                # Each word is one feature; special tokens are one more, ablated to themselves.
                groups = [len(item.words) if w is None else w for w in item.word_ids]
                attr = FeatureAblation(forward).attribute(
                    ids,
                    baselines=baseline,
                    additional_forward_args=extra,
                    feature_mask=torch.tensor([groups]),
                    perturbations_per_eval=internal_batch_size,
                )
                first = {w: pos for pos, w in reversed(list(enumerate(item.word_ids)))}
                n = len(item.words)
                scores = [float(attr[0, first[w]]) if w in first else 0.0 for w in range(n)]
            row["words"] = [{**w, "score": round(s, 6)} for w, s in zip(item.words, scores)]
            out.append(row)
    result = {"text": item.text, **item.fields, "method": method, "explanations": out}
    unread = _unread_words(item)
    if unread:  # the input was cut to the model's length: say so rather than look complete
        result["truncated"] = {"words_scored": len(item.words), "words": len(item.words) + unread}
    return result


def _unread_words(item: Explainable) -> int:
    """Words of the input after the last one the model read (cut at its maximum length),
    counted by whitespace in each text the words point into."""
    texts = {"text": item.text, **{k: v for k, v in item.fields.items() if isinstance(v, str)}}
    last: dict[str, int] = {}
    for w in item.words:
        key = w.get("in", "text")
        last[key] = max(last.get(key, 0), w["end"])
    return sum(len(texts[key][end:].split()) for key, end in last.items() if key in texts)


def _scalar(
    model: torch.nn.Module, keys: list[str], score: Callable[[torch.Tensor], torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """captum's forward function: input ids and the other inputs (named by `keys`, in order)
    -> the target's scalar, (B,)."""

    def forward(input_ids: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return score(model(input_ids=input_ids, **dict(zip(keys, args))).logits.float())

    return forward


def _sum_by_word(per_piece: torch.Tensor, word_ids: list[int | None], n_words: int) -> list[float]:
    """A word's score is the sum of its pieces' (IG is additive, so word scores keep
    completeness)."""
    scores = [0.0] * n_words
    for pos, w in enumerate(word_ids):
        if w is not None:
            scores[w] += float(per_piece[pos])
    return scores


# ---------------------------------------------------------------------- HTML


def html_page(rows: list[dict[str, Any]], title: str = "lmadapt explain") -> str:
    """A self-contained page: each text once per explanation, its words highlighted green
    (for the target) or red (against it), opacity by magnitude relative to the text's largest."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.8}"
        "h2{font-size:1em;margin-bottom:0}.w{border-radius:3px;padding:0 1px}"
        ".meta{color:#555;font-size:.9em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for row in rows:
        for ex in row["explanations"]:
            about = {k: v for k, v in ex.items() if k not in ("probability", "delta", "words")}
            name = "; ".join(
                f"{k}: {json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v}"
                for k, v in about.items()
            )
            meta = [f"method {row['method']}"]
            if ex.get("probability") is not None:
                meta.append(f"probability {ex['probability']:.4f}")
            if "delta" in ex:
                meta.append(f"convergence delta {ex['delta']:.4g}")
            parts.append(f"<section><h2>{html.escape(name)}</h2>")
            parts.append(f'<p class="meta">{html.escape(", ".join(meta))}</p>')
            fields = ["text"] + sorted({w["in"] for w in ex["words"] if "in" in w})
            for f in fields:
                words = [w for w in ex["words"] if w.get("in", "text") == f]
                parts.append(f"<p>{_highlight(row[f], words)}</p>")
            parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _highlight(text: str, words: list[dict[str, Any]]) -> str:
    top = max((abs(w["score"]) for w in words), default=0.0) or 1.0
    out, at = [], 0
    for w in sorted(words, key=lambda w: w["start"]):
        out.append(html.escape(text[at : w["start"]]))
        alpha = abs(w["score"]) / top
        rgb = "0,150,0" if w["score"] >= 0 else "220,0,0"
        out.append(
            f'<span class="w" style="background:rgba({rgb},{alpha:.3f})" '
            f'title="{w["score"]:.4g}">{html.escape(text[w["start"] : w["end"]])}</span>'
        )
        at = w["end"]
    out.append(html.escape(text[at:]))
    return "".join(out)
