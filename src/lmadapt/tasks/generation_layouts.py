"""Where a generation example's prompt and response go in the model, one layout per model kind.

A causal LM reads prompt and response as one sequence and learns the response's next tokens
(prompt tokens masked, or weighted β); an encoder-decoder (T5, BART) reads the prompt on its
encoder and learns the response on its decoder. `GenerationTask` picks the layout once, when it
learns its model (`layout_for`), and asks it whatever differs between the two: features,
collators, the model class, peft's task type, the loss and the prompt to decode from.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from lmadapt.data.batching import Collator, PackingCollator, Seq2SeqCollator
from lmadapt.data.chat import Conversation
from lmadapt.errors import ConfigError, DataError, LmadaptError

if TYPE_CHECKING:
    from lmadapt.models import ModelSpec
    from lmadapt.tasks.configs import GenerationConfig

IGNORE = -100


class Layout(Protocol):
    kind: str
    """The model kind it lays examples out for ('causal', 'seq2seq')."""
    peft_task_type: str

    @property
    def decoder_start(self) -> int | None:
        """The decoder's first input token (an encoder-decoder's); None for a causal LM."""

    def state(self) -> dict[str, Any]:
        """What the run's task state keeps of it (`layout_from_state` reads it back)."""

    def auto_model(self) -> type:
        """The transformers auto class its models load with."""

    def feature(
        self, ex: Conversation, ids: list[int], train: list[bool], tokenizer: Any
    ) -> dict[str, Any]:
        """One example's feature from its tokens and which of them are trained (responses)."""

    def collator(self, tokenizer: Any) -> Collator | PackingCollator | Seq2SeqCollator:
        """Training batches."""

    def eval_collator(self, tokenizer: Any) -> Collator | Seq2SeqCollator:
        """Batches for the response-only dev loss."""

    def response_only(self, batch: dict[str, torch.Tensor]) -> float:
        """Weigh `batch` so that `loss` is the response-only loss (comparable across runs);
        the number of tokens that loss averages over."""

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, Any]: ...

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def prompt_ids(self, feature: dict[str, Any], example: Conversation) -> list[int]:
        """The model input that decoding continues from."""


def layout_for(spec: ModelSpec, cfg: GenerationConfig) -> Layout:
    """The layout of `spec`'s model kind; settings it cannot use are refused."""
    if spec.kind == "seq2seq":
        return Seq2SeqLayout.for_model(spec, cfg)
    return CausalLayout(cfg)


def layout_from_state(state: dict[str, Any], cfg: GenerationConfig) -> Layout:
    """The layout a saved run's task state names (causal unless it says otherwise)."""
    if state.get("model_kind") == "seq2seq":
        return Seq2SeqLayout(cfg, state["decoder_start"])  # saved beside model_kind
    return CausalLayout(cfg)


class CausalLayout:
    """Prompt and response in one sequence; labels are the response tokens, loss_weights 1 on
    them and β on the rest (every token can train; rows can be packed)."""

    kind = "causal"
    peft_task_type = "CAUSAL_LM"
    decoder_start = None

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg

    def state(self) -> dict[str, Any]:
        return {}

    def auto_model(self) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def feature(
        self, ex: Conversation, ids: list[int], train: list[bool], tokenizer: Any
    ) -> dict[str, Any]:
        """Cut at max_length (a prompt to answer keeps its end); labels are the trained
        tokens, else -100; loss_weights 1 on them, β elsewhere, 0 on the first token."""
        # L = L_LM + α·L_align reads every token's loss (weight 1) and the response mask (labels)
        beta = 1.0 if self.cfg.align_weight is not None else float(self.cfg.lm_loss_weight)
        limit, n = self.cfg.max_length, len(ids)
        if ex.reference is None and ex.text is None:  # a prompt: keep its end
            ids, train = ids[-limit:], train[-limit:]
        ids, train = ids[:limit], train[:limit]
        if (ex.reference is not None or ex.text is not None) and not any(train[1:]):
            raise DataError(
                ex.file,
                f"no response token within task.max_length={limit} (the example has {n} "
                "tokens); raise task.max_length",
                ex.line,
            )
        labels = [t if on else IGNORE for t, on in zip(ids, train)]
        weights = [1.0 if on else beta for on in train]
        labels[0], weights[0] = IGNORE, 0.0  # never a target (also not across packed rows)
        return {"input_ids": ids, "labels": labels, "loss_weights": weights}

    def collator(self, tokenizer: Any) -> Collator | PackingCollator:
        if self.cfg.packing:
            return PackingCollator(tokenizer.pad_token_id, self.cfg.max_length)
        return self.eval_collator(tokenizer)

    def eval_collator(self, tokenizer: Any) -> Collator:
        return Collator(tokenizer.pad_token_id, {"labels": IGNORE, "loss_weights": 0.0})

    def response_only(self, batch: dict[str, torch.Tensor]) -> float:
        batch["loss_weights"] = (batch["labels"] != IGNORE).float()
        return float(batch["loss_weights"][:, 1:].sum())

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Logits only at the positions the loss reads (those predicting a weighted token).

        The LM head and the softmax over the whole vocabulary then skip prompt tokens, which
        saves their time and most of the logits' memory. `loss` sees fewer positions than
        tokens and picks the same ones again.
        """
        if not (self.cfg.loss_positions_only and _keeps_logits(model)):
            return {}
        return {"logits_to_keep": loss_positions(batch["loss_weights"])}

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted mean next-token cross-entropy: Σ w·ce / Σ w over shifted tokens.

        With w = 1 on responses and β on prompt tokens this is the per-token form of
        L = L_response + β·L_prompt (each prompt token counts β of a response token). With
        align_weight α, w = 1 on every token and the loss is L_LM + α·L_align, L_align the
        mean over the response tokens (those with a label).
        """
        ids, w = batch["input_ids"], batch["loss_weights"]
        if logits.shape[1] < ids.shape[1]:  # only the loss positions (forward_kwargs)
            pos = loss_positions(w) + 1

            def targets(m: torch.Tensor) -> torch.Tensor:
                return m[:, pos]
        else:
            logits = align_virtual(logits, batch)[:, :-1]

            def targets(m: torch.Tensor) -> torch.Tensor:
                return m[:, 1:]

        loss = _ce(logits, targets(ids), targets(w))
        if self.cfg.align_weight is not None:
            response = targets((batch["labels"] != IGNORE).float())
            loss = loss + self.cfg.align_weight * _ce(logits, targets(ids), response)
        return loss

    def prompt_ids(self, feature: dict[str, Any], example: Conversation) -> list[int]:
        """The tokens before the last response (the whole input for an unlabelled prompt;
        raw text without its end-of-text token, to be continued)."""
        if example.text is not None:
            return feature["input_ids"][:-1] or feature["input_ids"]
        labels = feature["labels"]
        ends = [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
        return feature["input_ids"][: ends[-1]] if ends else feature["input_ids"]


class Seq2SeqLayout:
    """The prompt on the encoder, the response alone on the decoder, which starts from
    `decoder_start`: no prompt tokens to train, no rows to pack, no raw text to continue."""

    kind = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"

    def __init__(self, cfg: GenerationConfig, decoder_start: int):
        self.cfg = cfg
        self.decoder_start = decoder_start

    @classmethod
    def for_model(cls, spec: ModelSpec, cfg: GenerationConfig) -> Seq2SeqLayout:
        """Refuse what only a causal LM can do; the decoder starts from the config's
        decoder_start_token_id (else its pad, else its eos token)."""
        for name, value in (
            ("packing", cfg.packing),
            ("lm_loss_weight", cfg.lm_loss_weight),
            ("align_weight", cfg.align_weight is not None),
        ):
            if value:
                raise ConfigError(
                    f"task.{name}",
                    f"needs a causal LM; {spec.name} is an encoder-decoder, whose decoder "
                    "learns the response alone",
                )
        from transformers import AutoConfig

        kw = spec.load_kwargs()
        kw.pop("use_safetensors", None)
        config = AutoConfig.from_pretrained(spec.path, **kw)
        start = config.decoder_start_token_id
        if start is None:
            start = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        return cls(cfg, int(start))

    def state(self) -> dict[str, Any]:
        return {"model_kind": "seq2seq", "decoder_start": self.decoder_start}

    def auto_model(self) -> type:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def feature(
        self, ex: Conversation, ids: list[int], train: list[bool], tokenizer: Any
    ) -> dict[str, Any]:
        """Encoder input = everything before the last response, its end kept within max_length
        and ending in eos (as T5 and BART saw inputs in pretraining); labels = that response,
        cut at max_length, ending in eos."""
        if ex.text is not None:
            raise DataError(
                ex.file,
                "raw text (continued pre-training) needs a causal LM; an encoder-decoder "
                "learns prompt -> response pairs",
                ex.line,
            )
        limit = self.cfg.max_length
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

        def ended(part: list[int]) -> list[int]:
            return part if not eos or part[-1:] == eos else part + eos

        end = max((i + 1 for i, on in enumerate(train) if on), default=0)
        start = end
        while start and train[start - 1]:  # the last response: the last run of trained tokens
            start -= 1
        if ex.reference is None:  # a prompt to answer: all of it
            return {"input_ids": ended(ids[-(limit - len(eos)) :])}
        source = ended(ids[:start][-(limit - len(eos)) :])
        return {"input_ids": source, "labels": ended(ids[start:end][: limit - len(eos)])}

    def collator(self, tokenizer: Any) -> Seq2SeqCollator:
        return Seq2SeqCollator(tokenizer.pad_token_id, self.decoder_start, IGNORE)

    def eval_collator(self, tokenizer: Any) -> Seq2SeqCollator:
        return self.collator(tokenizer)

    def response_only(self, batch: dict[str, torch.Tensor]) -> float:
        return float((batch["labels"] != IGNORE).sum())  # the labels are the response alone

    def forward_kwargs(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the response tokens: decoder logits (B, T_dec, V) line up
        with the labels, unshifted."""
        labels = batch["labels"]
        return _ce(align_virtual(logits, {"input_ids": labels}), labels, (labels != IGNORE).float())

    def prompt_ids(self, feature: dict[str, Any], example: Conversation) -> list[int]:
        return feature["input_ids"]  # the encoder's input is the prompt


def align_virtual(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Drop the positions of virtual tokens that prompt-learning methods put before the input."""
    extra = logits.shape[1] - batch["input_ids"].shape[1]
    if extra and "position_ids" in batch:
        raise LmadaptError(
            "task.packing does not work with prompt-learning methods (peft drops position_ids)"
        )
    return logits[:, extra:] if extra else logits


def loss_positions(weights: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token t+1 carries loss weight in any row of the batch."""
    return (weights[:, 1:] > 0).any(0).nonzero().squeeze(1)


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model can return logits at chosen positions (`logits_to_keep`, transformers'
    causal LMs). Prompt-learning methods put virtual tokens first, which would shift them."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return False
    get_base_model = getattr(model, "get_base_model", None)  # a peft model's
    base: torch.nn.Module = get_base_model() if get_base_model is not None else model
    return _forward_takes(type(base).forward, "logits_to_keep")


@functools.cache
def _forward_takes(forward: Callable[..., Any], name: str) -> bool:
    """Asked every training step; the signature is read once per model class (its `forward`)."""
    return name in inspect.signature(forward).parameters


def _ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·ce / Σ w over aligned (logits, target) pairs; only weighted pairs are computed."""
    w = weights.float()
    keep = w > 0
    if not keep.any():
        return logits.sum() * 0.0  # keeps the graph: a batch of prompts only adds nothing
    ce = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    return (ce * w[keep]).sum() / w[keep].sum()
