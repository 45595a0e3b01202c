"""Finished runs held in memory for serving, with one base model shared by sibling adapters.

Runs saved as peft adapters over the same base model (same weights, task kind and head size)
form one `ModelGroup`: the base is loaded once, each further run is attached with
`PeftModel.load_adapter`, and every forward pass (or generation) first selects its run's adapter
under the group's lock. Any other run is a group of one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmadapt import api
from lmadapt.config import RunConfig
from lmadapt.errors import LmadaptError
from lmadapt.inference import predict_examples
from lmadapt.methods.base import PeftMethod
from lmadapt.models import ModelSpec
from lmadapt.tasks.generation import GenerationSettings


@dataclass
class ServedRun:
    """One run as the server sees it: its name, task and tokenizer; the model is its group's."""

    name: str
    run_dir: Path
    config: RunConfig
    task: Any
    tokenizer: Any
    spec: ModelSpec
    method: Any

    @property
    def kind(self) -> str:
        return self.task.kind

    def info(self) -> dict[str, Any]:
        labels = getattr(self.task, "labels", None)
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
    if info.task.kind == "generation":
        info.task.template(info.tokenizer)  # resolved now, so a bad template fails start-up
    return ServedRun(
        name, info.run_dir, info.config, info.task, info.tokenizer, info.spec, info.method
    )


def share_key(run: ServedRun) -> tuple | None:
    """Runs with equal keys can share one base model; None = this run needs its own model."""
    if not isinstance(run.method, PeftMethod):
        return None
    head = len(getattr(run.task, "labels", ()) or ())
    # One PeftModel holds one tuner type (LoRA, IA3, prefix...), hence the method name.
    return (
        run.spec.path,
        run.spec.gguf_file,
        run.config.trust_remote_code,
        run.kind,
        head,
        run.config.method.name,
    )


@dataclass
class GenerationJob:
    """One prompt to continue: its templated token ids, how to decode, and an optional
    transformers streamer that receives the tokens as they come."""

    prompt_ids: list[int]
    settings: GenerationSettings
    streamer: Any = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
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

    @property
    def kind(self) -> str:
        return next(iter(self.runs.values())).kind

    @property
    def context(self) -> int | None:
        """Most positions the model embeds (prompt + new tokens), when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def _activate(self, name: str) -> None:
        if self.adapters:
            self.model.set_adapter(self.adapters[name], inference_mode=True)

    def predict(self, name: str, texts: list[str]) -> list[dict[str, Any]]:
        """The same computation as `lmadapt.api.predict` on texts, with `name`'s adapter active."""
        run = self.runs[name]
        examples = run.task.examples_from_texts(texts)
        feats = run.task.encode(examples, run.tokenizer)
        with self.lock:
            self._activate(name)
            return predict_examples(
                self.model,
                run.task,
                feats,
                examples,
                run.task.collator(run.tokenizer),
                self.batch_size,
            )

    def generate(self, key: tuple[str, Any], jobs: list[GenerationJob]) -> list[Completion]:
        """One `decode_ids` call of the generation task over jobs that share a run (`key[0]`)
        and decoding settings, with that run's adapter active."""
        name, first = key[0], jobs[0]
        run = self.runs[name]
        with self.lock:
            self._activate(name)
            try:
                out = run.task.decode_ids(
                    self.model, [j.prompt_ids for j in jobs], first.settings, first.streamer
                )
            except BaseException:
                if first.streamer is not None:
                    first.streamer.end()  # wakes the reader; the error reaches it via the future
                raise
        return [
            Completion(text, len(j.prompt_ids), n, finish)
            for j, text, n, finish in zip(jobs, out.texts, out.lengths, out.finish)
        ]


def load_groups(run_dirs: list[str | Path], batch_size: int) -> list[ModelGroup]:
    """Load every run, one base model per share key; run names (dir basenames) must be unique."""
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
    groups = []
    for members in by_key.values():
        first = members[0]
        model = first.method.load(
            first.task, first.spec, first.run_dir / "model", first.config.trust_remote_code
        )
        adapters: dict[str, str] = {}
        if len(members) > 1:
            adapters[first.name] = model.active_adapter
            # peft names the first adapter "default"; numbered names cannot collide with it.
            for i, run in enumerate(members[1:], start=1):
                adapters[run.name] = f"run{i}"
                model.load_adapter(str(run.run_dir / "model"), adapter_name=f"run{i}")
        model.eval()
        groups.append(
            ModelGroup(model, {r.name: r for r in members}, adapters, batch_size=batch_size)
        )
    return groups
