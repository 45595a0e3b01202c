"""Finished runs held in memory for serving, with one copy of a base model for its adapters.

Runs saved as peft adapters of one method over the same base model (same weights, task kind and
head size) form one `ModelGroup`: the base is loaded once, each further run is attached with
`PeftModel.load_adapter`, and every forward pass (or generation) first selects its run's adapter
under the group's lock. Any other run is a group of one.

A peft model holds adapters of a single tuner type, and peft's `PeftMixedModel` takes LoRA-like
tuners only (not IA3, prompt learning or the bottleneck adapters) and no task head, so runs of
other methods or tasks over one base are separate models. They still need only one copy of the
frozen base: `BasePool` makes their equal weight tensors one tensor (see there).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from peft import PeftModel

from lmadapt import api
from lmadapt.config import RunConfig
from lmadapt.errors import LmadaptError
from lmadapt.inference import Encoded, GenerationSettings
from lmadapt.methods.base import PeftMethod, WholeModelMethod
from lmadapt.models import ModelSpec
from lmadapt.rundir import RunDir

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task
    from lmadapt.tasks.generation import GenerationTask


@dataclass
class ServedRun:
    """One run as the server sees it: its name, task and tokenizer; the model is its group's."""

    name: str
    run_dir: Path
    config: RunConfig
    task: Task
    tokenizer: Any
    spec: ModelSpec
    method: Any

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def generation(self) -> GenerationTask:
        """The task of a run served at the generation endpoints (its endpoint is 'generate')."""
        if self.task.endpoint != "generate":
            raise LmadaptError(f"run {self.name!r} ({self.kind}) does not generate text")
        return cast("GenerationTask", self.task)

    def info(self) -> dict[str, Any]:
        labels = self.task.labels
        return {
            "task": self.kind,
            "method": self.config.method.name,
            "base_model": self.spec.name,
            **({"labels": list(labels)} if labels else {}),
        }


def read_run(run_dir: str | Path) -> ServedRun:
    """A run's config, task and tokenizer, without loading its model (so groups can share one)."""
    info = api.read_run(run_dir)
    name = info.run_dir.resolve().name
    run = ServedRun(
        name, info.run_dir, info.config, info.task, info.tokenizer, info.spec, info.method
    )
    if run.task.endpoint == "generate":
        run.generation.template(run.tokenizer)  # resolved now, so a bad template fails start-up
    return run


def base_key(run: ServedRun) -> tuple | None:
    """Runs with equal keys load the same frozen base weights; None = the run saved a whole
    model of its own (full fine-tuning, BitFit), which shares nothing."""
    if isinstance(run.method, WholeModelMethod):
        return None
    if run.config.quantize != "none":  # quantised weights are packed per model: not pooled
        return None
    return (run.spec.path, run.spec.gguf_file, run.config.trust_remote_code)


def share_key(run: ServedRun) -> tuple | None:
    """Runs with equal keys can share one base model; None = this run needs its own model."""
    if not isinstance(run.method, PeftMethod):
        return None
    head = len(run.task.labels)
    # One PeftModel holds one tuner type (LoRA, IA3, prefix...), hence the method name.
    return (
        run.spec.path,
        run.spec.gguf_file,
        run.config.trust_remote_code,
        run.kind,
        head,
        run.config.method.name,
        run.config.quantize,
    )


@dataclass
class GenerationJob:
    """One prompt to continue: its templated token ids, how to decode, an optional
    transformers streamer that receives the tokens as they come, and `cancelled`, set when the
    client has gone."""

    prompt_ids: list[int]
    settings: GenerationSettings
    streamer: Any = None
    cancelled: threading.Event = field(default_factory=threading.Event)


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    """Either "stop" (end of turn or a stop string) or "length" (max_new_tokens ran out)."""


@dataclass
class ModelGroup:
    """One model in memory serving one or more runs (adapters); forward passes are serialised."""

    model: torch.nn.Module
    runs: dict[str, ServedRun]
    adapters: dict[str, str] = field(default_factory=dict)
    """Run name -> peft adapter name, when the model is a PeftModel shared by several runs."""
    batch_size: int = 32
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: int = 0
    """Groups with equal `base` hold one copy of their base model's weights (see BasePool)."""

    @property
    def endpoint(self) -> str:
        return next(iter(self.runs.values())).task.endpoint

    @property
    def context(self) -> int | None:
        """Most positions the model embeds (prompt + new tokens), when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def _activate(self, name: str) -> None:
        if self.adapters:
            # several runs' adapters share the model: a PeftModel
            cast(PeftModel, self.model).set_adapter(self.adapters[name], inference_mode=True)

    def predict(self, name: str, texts: list[str]) -> list[dict[str, Any]]:
        """The same computation as `lmadapt.api.predict` on texts, with `name`'s adapter active."""
        run = self.runs[name]
        examples = run.task.examples_from_texts(texts)
        data = Encoded(
            run.task.encode(examples, run.tokenizer),
            examples,
            run.task.collator(run.tokenizer),
            self.batch_size,
        )
        with self.lock:
            self._activate(name)
            return run.task.predict_model(self.model, data)

    def explain(
        self, name: str, texts: list[str], method: str, label: str | None, steps: int
    ) -> list[dict[str, Any]]:
        """`lmadapt.api.explain` on texts with `name`'s adapter active. It needs gradients, so
        it runs on its own, not in a micro-batch."""
        run = self.runs[name]
        with self.lock:
            self._activate(name)
            loaded = api.LoadedRun(run.config, run.task, self.model, run.tokenizer, run.spec)
            return api.explain(loaded, texts, method=method, label=label, steps=steps)

    def generate(self, key: tuple[str, Any], jobs: list[GenerationJob]) -> list[Completion]:
        """One `decode_ids` call of the generation task over jobs that share a run (`key[0]`)
        and decoding settings, with that run's adapter active; it stops early once every job's
        client has gone."""
        name, first = key[0], jobs[0]
        run = self.runs[name]
        with self.lock:
            self._activate(name)
            try:
                out = run.generation.decode_ids(
                    self.model,
                    [j.prompt_ids for j in jobs],
                    first.settings,
                    first.streamer,
                    cancelled=lambda: all(j.cancelled.is_set() for j in jobs),
                )
            except BaseException:
                if first.streamer is not None:
                    first.streamer.end()  # wakes the reader; the error reaches it via the future
                raise
        # Decoded.finish holds only "stop" and "length", typed as str
        return [
            Completion(text, len(j.prompt_ids), n, cast(FinishReason, finish))
            for j, text, n, finish in zip(jobs, out.texts, out.lengths, out.finish)
        ]


class BasePool:
    """One copy of each base model's weights across the groups loaded on it.

    Every parameter of a group's model is looked up by its name in the transformers model (peft's
    wrapping taken out); one equal in shape, dtype and values to a parameter already held for
    the same base replaces it, and the copy is freed. Values are unchanged, so every run answers
    exactly as when loaded alone; adapters and trained heads differ and stay the group's own.
    Serving never writes weights, so groups may read shared tensors from their own threads.
    """

    def __init__(self) -> None:
        self.held: dict[tuple[tuple, str], tuple[torch.nn.Parameter, ModelGroup]] = {}

    def adopt(self, group: ModelGroup, key: tuple) -> None:
        """Share `group`'s base tensors with the groups adopted before it on `key`; its `base`
        becomes that of the first group it shares a tensor with."""
        own = group.base
        model = group.model.get_base_model() if isinstance(group.model, PeftModel) else group.model
        for module_name, module in list(model.named_modules()):
            for leaf, p in list(module.named_parameters(recurse=False)):
                name = f"{module_name}.{leaf}".replace(".base_layer.", ".")
                q, owner = self.held.setdefault((key, name), (p, group))
                if q is p or q.shape != p.shape or q.dtype != p.dtype or not torch.equal(q, p):
                    continue
                setattr(module, leaf, q)
                if group.base == own:
                    group.base = owner.base


def load_groups(
    run_dirs: list[str | Path], batch_size: int, device: torch.device
) -> list[ModelGroup]:
    """Load every run onto `device`, one model per share key and one copy of each base
    (BasePool); run names (directory basenames) must be unique."""
    runs = [read_run(d) for d in run_dirs]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.name in seen:
            raise LmadaptError(
                f"two runs are named '{run.name}' ({seen[run.name]} and {run.run_dir}); "
                "serve needs unique directory names"
            )
        seen[run.name] = run.run_dir
    by_key: dict[Any, list[ServedRun]] = {}
    for run in runs:
        by_key.setdefault(share_key(run) or ("own", run.name), []).append(run)
    groups: list[ModelGroup] = []
    pool = BasePool()
    for members in by_key.values():
        first = members[0]
        base = api.base_spec(first.config, first.spec, first.task, device)
        model = first.method.load(
            first.task, base, RunDir(first.run_dir).model, first.config.trust_remote_code
        )
        adapters: dict[str, str] = {}
        if len(members) > 1:
            adapters[first.name] = model.active_adapter
            # peft names the first adapter "default"; numbered names cannot collide with it.
            for i, run in enumerate(members[1:], start=1):
                adapters[run.name] = f"run{i}"
                model.load_adapter(str(RunDir(run.run_dir).model), adapter_name=f"run{i}")
        model.to(device).eval()
        group = ModelGroup(
            model, {r.name: r for r in members}, adapters, batch_size, base=len(groups)
        )
        key = base_key(first)
        if key is not None:  # now, so that at most one extra copy of a base is ever in memory
            pool.adopt(group, key)
        groups.append(group)
    return groups
