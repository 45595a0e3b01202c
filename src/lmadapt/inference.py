"""Batched forward passes for evaluation and prediction (no gradients, length-sorted batches)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from lmadapt.data.batching import sequential_batches
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import ConfigError


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16())


def autocast_bf16(precision: str, device: torch.device) -> bool:
    """Autocast where it pays: the CPU's bf16 units decide on the CPU, the GPU's support on CUDA."""
    if device.type == "cuda":
        return precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    return use_bf16(precision)


def frozen_base_dtype(base_dtype: str, bf16: bool, device: torch.device, strategy: str) -> str:
    """How a PEFT method's frozen weights compute while it trains (`train.base_dtype`): "fp32",
    "bf16" (auto = on CUDA with bf16 autocast) or "int8" (fbgemm's CPU kernels)."""
    if base_dtype == "int8":
        if device.type != "cpu" or torch.backends.quantized.engine not in ("x86", "fbgemm"):
            raise ConfigError(
                "train.base_dtype", "int8 frozen weights use fbgemm's kernels, on an x86 CPU"
            )
        if bf16:
            raise ConfigError(
                "train.base_dtype",
                "int8 frozen weights take fp32 activations; set train.precision to fp32",
            )
        return "int8"
    if base_dtype == "fp32" or not bf16:
        if base_dtype == "bf16":
            raise ConfigError(
                "train.base_dtype", "bf16 frozen weights need bf16 autocast, which is off here"
            )
        return "fp32"
    if strategy == "fsdp":  # fsdp flattens each block's parameters into one dtype
        if base_dtype == "bf16":
            raise ConfigError("train.base_dtype", "fsdp needs one dtype per block; use fp32")
        return "fp32"
    return "bf16" if base_dtype == "bf16" or device.type == "cuda" else "fp32"


def bf16_castable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights a bf16 frozen base holds in bf16: the floating-point parameters of modules
    that train none of their own (BitFit's modules, which train their biases, stay fp32: ops
    such as layer_norm take one dtype for all of their weights)."""
    return [
        p
        for m in model.modules()
        if not any(p.requires_grad for p in m.parameters(recurse=False))
        for p in m.parameters(recurse=False)
        if p.is_floating_point()
    ]


def autocast(enabled: bool, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode inside, in the mode it had after. Switching walks every submodule:
    4.5 ms on MiniLM with LoRA on all its linears, a fifth of a one-text prediction, so a
    model already in eval mode (a served one) is left as it is."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class Generates(Protocol):
    """A model with transformers' `generate` (a causal or seq2seq LM, its peft wrapper, or an
    OnDevice view of one), returning the ids (`return_dict_in_generate` left off)."""

    def generate(self, **kwargs: Any) -> torch.Tensor: ...


class OnDevice(torch.nn.Module):
    """View of a model whose weights are on a GPU: the inference code builds CPU batches and reads
    CPU logits, so inputs go to the device and logits and generated ids come back."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device = model, device
        self.training = model.training  # the view's mode is the model's (see eval_mode)

    def _to(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kwargs.items()}

    def forward(self, **inputs: Any) -> Any:
        out = self.model(**self._to(inputs))
        for key, value in list(out.items()):  # logits, or a task's own (start_logits, ...)
            if torch.is_tensor(value):
                out[key] = value.cpu()
        return out

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return cast(Generates, self.model).generate(**self._to(kwargs)).cpu()


def on_model_device(model: torch.nn.Module) -> torch.nn.Module:
    """The model as the inference code calls it (CPU tensors in and out) wherever its weights are:
    itself on the CPU, else an OnDevice view. The one place batches move to a device."""
    if isinstance(model, OnDevice):
        return model
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type == "cpu":
        return model
    return OnDevice(model, weight.device)


LOSS_ONLY_KEYS = ("labels", "loss_weights", "teacher_logits", "reference_logps")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward arguments: the batch without what only the loss reads.

    A batch with `position_ids` is packed (several examples per row, positions restarting at
    each); it goes without its padding mask so that transformers masks attention per example.
    """
    inputs = {k: v for k, v in batch.items() if k not in LOSS_ONLY_KEYS}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
    return inputs


@dataclass(frozen=True)
class Encoded:
    """Examples as a task runs its model on them (`Task.evaluate_model`, `predict_model` and the
    capabilities that score or tune on a split): the features, the examples they encode, the
    collator that batches the features and the batch size always travel together. Here, below
    the tasks, so that the loop and evaluation, which tasks build on, can make one."""

    features: list[dict[str, Any]]
    """What `Task.encode` made of `examples`, in the same order: one per example, or several
    where the task cuts an input into windows (`Task.feature_counts`)."""
    examples: list[Any]
    """The examples themselves: what scoring and decoding read besides the model's outputs
    (gold labels, references, words, contexts)."""
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    """The task's collator (`Task.collator`) for the tokenizer that encoded `features`."""
    batch_size: int
    """How many features go through the model at once."""
    forward_args: Callable[[list[int]], dict[str, Any]] | None = None
    """Extra forward arguments for a batch of the features at these indices: a server batching
    several LoRA adapters of one model gives each row its own (`adapter_names`)."""

    def __len__(self) -> int:
        """The number of examples."""
        return len(self.examples)


@torch.no_grad()
def batched_logits(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    bf16: bool = False,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    per_token: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    read: Callable[[Any], torch.Tensor] | None = None,
    forward_args: Callable[[list[int]], dict[str, Any]] | None = None,
) -> tuple[list[np.ndarray], float | None]:
    """Logits for every feature, in input order, and the mean loss when labels are present.

    `read` takes the logits out of the model's output (default `output.logits`); `transform`
    maps a batch's logits to what is kept (and what `loss_fn` reads), e.g. a
    prompt-based classifier's label scores out of the LM's vocabulary logits; `forward_args`
    adds arguments per batch from its features' indices (see `Encoded.forward_args`).

    fp32 by default, also after bf16 training: saved artifacts then give the same numbers here as
    in plain transformers/peft.

    Sequence-level logits come back as (C,) arrays; with `per_token`, (T_i, C) arrays trimmed to
    each example's own length.
    """
    model = on_model_device(model)
    out: list[np.ndarray | None] = [None] * len(features)
    lengths = [len(f["input_ids"]) for f in features]
    total_loss, n_loss = 0.0, 0
    with eval_mode(model):
        for idx in sequential_batches(lengths, batch_size):
            batch = collator([features[i] for i in idx])
            extra = forward_args(idx) if forward_args is not None else {}
            with autocast(bf16):
                output = model(**model_inputs(batch), **extra)
            logits = output.logits if read is None else read(output)
            logits = logits.float() if transform is None else transform(logits).float()
            if loss_fn is not None and "labels" in batch:
                total_loss += float(loss_fn(logits, batch)) * len(idx)
                n_loss += len(idx)
            arr = logits.numpy()
            # Prompt/p-tuning prepend virtual tokens to the logits: per token, keep the real ones.
            skip = arr.shape[1] - batch["input_ids"].shape[1] if per_token else 0
            for row, i in enumerate(idx):
                out[i] = arr[row, skip : skip + lengths[i]] if per_token else arr[row]
    return out, (total_loss / n_loss if n_loss else None)  # type: ignore[return-value]


@dataclass
class Decoded:
    texts: list[str]
    seconds: float
    lengths: list[int]
    """New tokens per prompt, up to its end token (what a server bills as completion tokens)."""
    finish: list[str]
    """Per prompt: "stop" (an end token or stop string) or "length" (max_new_tokens ran out)."""

    @property
    def new_tokens(self) -> int:
        return sum(self.lengths)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tok: Any,
    prompts: list[list[int]],
    settings: GenerationSettings,
    eos_ids: list[int],
    stop_texts: list[str],
    batch_size: int,
    streamer: Any = None,
    cancelled: Callable[[], bool] | None = None,
) -> Decoded:
    """The one decoder: continue each prompt (left-padded batches, shortest first) until an id in
    `eos_ids`, a string in `stop_texts` (cut from the text) or `max_new_tokens`; greedy unless
    `settings.do_sample`, beam search with `settings.num_beams` > 1. A transformers streamer
    (one prompt, one beam) receives the tokens as they are generated. An encoder-decoder reads
    the prompt on its encoder and returns only new tokens after its decoder's start token.
    `cancelled() == True` (whoever asked has gone) ends every sequence after its next token."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import StoppingCriteriaList

    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    gen = HFGenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        temperature=settings.temperature if settings.do_sample else None,
        top_p=settings.top_p if settings.do_sample else None,
        top_k=None,
        num_beams=settings.num_beams,
        eos_token_id=eos_ids,
        pad_token_id=pad,
        use_cache=True,
        stop_strings=stop_texts or None,
    )
    if streamer is not None and settings.num_beams > 1:
        raise ConfigError("num_beams", "beam search cannot stream; use num_beams: 1")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    model = on_model_device(model)
    texts: list[str | None] = [None] * len(prompts)
    lengths, finish = [0] * len(prompts), ["length"] * len(prompts)
    t0 = time.perf_counter()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with eval_mode(model):
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            extra: dict[str, Any] = {"tokenizer": tok} if stop_texts else {}
            if cancelled is not None:
                extra["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancelled)])
            out = cast(Generates, model).generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=gen,
                streamer=streamer,
                **extra,
            )
            for row, i in enumerate(idx):
                seq = out[row, 1:].tolist() if encoder_decoder else out[row, width:].tolist()
                end = next((j for j, t in enumerate(seq) if t in eos_ids), len(seq))
                text = tok.decode(seq[:end], skip_special_tokens=True)
                stopped = end < len(seq) or any(s in text for s in stop_texts)
                if stopped and end == len(seq):  # a stop string: the rest is batch padding
                    while end and seq[end - 1] == pad:
                        end -= 1
                lengths[i], finish[i] = end, "stop" if stopped else "length"
                texts[i] = cut_at_stops(text, stop_texts)
    seconds = time.perf_counter() - t0
    return Decoded(texts, seconds, lengths, finish)  # type: ignore[arg-type]


class _Cancelled:
    """A transformers stopping criterion (duck-typed): every row is done once `cancelled()`."""

    def __init__(self, cancelled: Callable[[], bool]):
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancelled(), device=input_ids.device)


def cut_at_stops(text: str, stops: list[str]) -> str:
    """Text before the first stop string (generate() stops after it, so it may be included)."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut].strip()
