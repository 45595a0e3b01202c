"""Finished runs held in memory for serving, with one copy of a base model for its adapters.

Runs saved as peft adapters of one method over the same base model (same weights, task kind and
head size) form one `ModelGroup`: the base is loaded once, each further run is attached with
`PeftModel.load_adapter`, and every forward pass (or generation) first selects its run's adapter
under the group's lock. Any other run is a group of one.

A peft model holds adapters of a single tuner type, and peft's `PeftMixedModel` takes LoRA-like
tuners only (not IA3, prompt learning or the bottleneck adapters) and no task head, so runs of
other methods or tasks over one base are separate models. They still need only one copy of the
frozen base: `BasePool` makes their equal weight tensors one tensor (see there).

A directory `lmadapt export --format onnx` wrote is served like its run, by ONNX Runtime on the
CPU (`engine` "onnxruntime"): the same task decodes the graph's logits, so the answers have the
same shape and, within the export's checked tolerance, the same values.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper

from lmadapt import api
from lmadapt.config import RunConfig
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import LmadaptError
from lmadapt.export_onnx import OnnxModel, is_onnx_export, read_export
from lmadapt.inference import Encoded
from lmadapt.methods.base import PeftMethod, WholeModelMethod
from lmadapt.models import ModelSpec
from lmadapt.rundir import RunDir

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import LogitsTask, Task
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
    engine: Literal["pytorch", "onnxruntime"] = "pytorch"
    """What runs the model: the run's PyTorch weights, or an ONNX export's graph."""
    tokenizer_files: str = ""
    """A hash of the tokenizer files it saved (`tokenizer_digest`): equal hashes, equal
    tokenizers."""

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
            "engine": self.engine,
            **({"labels": list(labels)} if labels else {}),
        }


def read_run(run_dir: str | Path) -> ServedRun:
    """A run's (or an ONNX export's) config, task and tokenizer, without loading its model (so
    groups can share one)."""
    onnx = is_onnx_export(run_dir)
    info = read_export(run_dir) if onnx else api.read_run(run_dir)
    name = info.run_dir.resolve().name
    run = ServedRun(
        name,
        info.run_dir,
        info.config,
        info.task,
        info.tokenizer,
        info.spec,
        info.method,
        "onnxruntime" if onnx else "pytorch",
        tokenizer_digest(info.run_dir if onnx else RunDir(info.run_dir).model),
    )
    if run.task.endpoint == "generate":
        run.generation.template(run.tokenizer)  # resolved now, so a bad template fails start-up
    return run


def base_key(run: ServedRun) -> tuple | None:
    """Runs with equal keys load the same frozen base weights; None = the run saved a whole
    model of its own (full fine-tuning, BitFit, an ONNX graph), which shares nothing."""
    if isinstance(run.method, WholeModelMethod) or run.engine != "pytorch":
        return None
    if run.config.quantize != "none":  # quantised weights are packed per model: not pooled
        return None
    return (run.spec.path, run.spec.gguf_file, run.config.trust_remote_code)


def share_key(run: ServedRun) -> tuple | None:
    """Runs with equal keys can share one base model; None = this run needs its own model."""
    if not isinstance(run.method, PeftMethod) or run.engine != "pytorch":
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


MIXABLE_HEADS = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
)
"""Trained heads (peft's modules_to_save) whose per-adapter copies peft can run in one mixed
batch: the list in peft's ModulesToSaveWrapper._mixed_batch_forward (peft 0.21), which raises
TypeError for any other module."""
TOKENIZER_FILES = (
    "tokenizer",
    "special_tokens_map",
    "vocab",
    "merges",
    "added_tokens",
    "chat_template",
    "spiece",
    "sentencepiece",
)
"""Name prefixes of the files a tokenizer is loaded from (transformers' save_pretrained)."""


def tokenizer_digest(model_dir: Path) -> str:
    """A hash of the tokenizer files a run saved: equal digests load equal tokenizers."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name.startswith(TOKENIZER_FILES):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def share_tokenizer(run: ServedRun, others: Iterable[ServedRun]) -> None:
    """Give `run` the tokenizer object of a run of its model that saved the same tokenizer
    files: one copy (about 10 MB for a BERT vocabulary) instead of one per adapter. Runs of one
    model are encoded in its batcher thread, one batch at a time, so sharing is safe."""
    for other in others:
        if other.tokenizer_files == run.tokenizer_files:
            run.tokenizer = other.tokenizer
            return


MIXED = "mixed adapters"
"""First element of a batch key whose requests go through one forward pass, each row with its
own run's adapter (`ModelGroup.batch_key`)."""


def adapter_bytes(model: torch.nn.Module, adapter: str) -> int:
    """Bytes of one peft adapter's weights in `model` (its LoRA matrices and head copy)."""
    part = f".{adapter}."
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if part in n)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


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
    share: Hashable = None
    """The `share_key` of its runs: a run with the same key joins this group as an adapter."""
    mixed: int = 0
    """Forward passes that mixed several runs' adapters (`batch_key`)."""

    @property
    def endpoint(self) -> str:
        return next(iter(self.runs.values())).task.endpoint

    @property
    def context(self) -> int | None:
        """Most positions the model embeds (prompt + new tokens), when its config says."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    def _is_active(self, name: str) -> bool:
        return not self.adapters or (
            cast(PeftModel, self.model).active_adapter == self.adapters[name]
        )

    def _activate(self, name: str) -> None:
        """Make `name`'s adapter the active one of the shared PeftModel. peft's set_adapter
        walks every module and every adapter's parameters (its cost grows with the adapters
        loaded), so it runs only when the adapter changes."""
        if not self._is_active(name):
            cast(PeftModel, self.model).set_adapter(self.adapters[name], inference_mode=True)

    def batch_key(self, run: ServedRun) -> Hashable:
        """Prediction requests with equal keys share forward passes: those of one run, or, where
        the runs' method lets peft send each row through its own adapter, those of every run
        of this model with the same task settings and vocabulary."""
        if (
            self.adapters
            and run.method.mixed_batches
            and run.task.endpoint != "generate"
            and self.heads_mix
        ):
            tok = run.tokenizer
            return (MIXED, repr(run.config.task), len(tok), tok.pad_token_id)
        return run.name

    @functools.cached_property
    def heads_mix(self) -> bool:
        """Whether peft can route rows through each adapter's copy of the trained heads: it
        can for plain layers (classifiers, QA's span head), not for other modules, such as a
        BERT pooler copied whole (LoRA runs trained before `methods.lora.linear_heads`)."""
        return all(
            isinstance(m.original_module, MIXABLE_HEADS)
            for m in self.model.modules()
            if isinstance(m, ModulesToSaveWrapper)
        )

    def predict(self, key: Hashable, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        """Predictions for (run name, input) items, the same computation as
        `lmadapt.api.predict`: items of several runs (a mixed `batch_key`) in one forward pass
        whose rows each go through their run's adapter; one run's with its adapter active."""
        by_run: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(items):
            by_run.setdefault(name, []).append(i)
        parts = {n: self._encode(n, [items[i][1] for i in idx]) for n, idx in by_run.items()}
        with self.lock:
            # one run's rows: the plain path if its adapter is active; under a mixed key peft's
            # per-row routing beats switching adapters (21 against 28 ms a text with 20 LoRA
            # adapters of MiniLM loaded) though it costs 15% more than the plain path
            only = next(iter(parts)) if len(parts) == 1 else None
            if only is not None and (key == only or self._is_active(only)):
                self._activate(only)
                rows = {only: self.runs[only].task.predict_model(self.model, parts[only])}
            else:
                rows = self._mixed(parts)
        out: list[dict[str, Any]] = [{}] * len(items)
        for name, idx in by_run.items():
            for i, row in zip(idx, rows[name]):
                out[i] = row
        return out

    def _encode(self, name: str, inputs: list[Any]) -> Encoded:
        run = self.runs[name]
        examples = run.task.examples_from_texts(inputs)
        return Encoded(
            run.task.encode(examples, run.tokenizer),
            examples,
            run.task.collator(run.tokenizer),
            self.batch_size,
        )

    def _mixed(self, parts: dict[str, Encoded]) -> dict[str, list[dict[str, Any]]]:
        """Every run's features through the model at once, each row with its run's adapter
        (peft's `adapter_names`); each run's task decodes its own rows."""
        features: list[dict[str, Any]] = []
        adapters: list[str] = []
        spans = {}
        for name, data in parts.items():
            spans[name] = (len(features), len(features) + len(data.features))
            features += data.features
            adapters += [self.adapters[name]] * len(data.features)
        first = next(iter(parts.values()))
        joint = Encoded(
            features,
            [],
            first.collator,
            self.batch_size,
            forward_args=lambda idx: {"adapter_names": [adapters[i] for i in idx]},
        )
        task = cast("LogitsTask", self.runs[next(iter(parts))].task)
        outputs, _ = task.batch_outputs(self.model, joint)
        self.mixed += len(parts) > 1
        return {
            name: cast("LogitsTask", self.runs[name].task).decode(
                outputs[a:b], parts[name].examples
            )
            for name, (a, b) in spans.items()
        }

    def attach(self, run: ServedRun, adapter: str) -> int:
        """Load `run`'s adapter into this group's PeftModel as `adapter`; returns its bytes."""
        share_tokenizer(run, self.runs.values())
        model = cast(PeftModel, self.model)
        device = next(model.parameters()).device
        with self.lock:
            model.load_adapter(str(RunDir(run.run_dir).model), adapter, torch_device=str(device))
            model.eval()
            self.adapters[run.name], self.runs[run.name] = adapter, run
        return adapter_bytes(model, adapter)

    def detach(self, name: str) -> None:
        """Unload one run's adapter from the shared model (never its last: the group goes)."""
        with self.lock:
            cast(PeftModel, self.model).delete_adapter(self.adapters.pop(name))
            del self.runs[name]

    def explain(
        self, name: str, texts: list[str], method: str, label: str | None, steps: int
    ) -> list[dict[str, Any]]:
        """`lmadapt.api.explain` on texts with `name`'s adapter active. It needs gradients, so
        it runs on its own, not in a micro-batch."""
        run = self.runs[name]
        if run.engine != "pytorch":
            raise LmadaptError(
                f"model {name!r} is served by {run.engine}, which computes no gradients; "
                "explain the PyTorch run it was exported from"
            )
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
        model = load_model(first, device)
        adapters: dict[str, str] = {}
        if len(members) > 1:
            adapters[first.name] = cast(PeftModel, model).active_adapter
            # peft names the first adapter "default"; numbered names cannot collide with it.
            for i, run in enumerate(members[1:], start=1):
                share_tokenizer(run, members[:i])
                adapters[run.name] = f"run{i}"
                cast(PeftModel, model).load_adapter(
                    str(RunDir(run.run_dir).model), adapter_name=f"run{i}"
                )
        model.to(device).eval()
        group = ModelGroup(
            model,
            {r.name: r for r in members},
            adapters,
            batch_size,
            base=len(groups),
            share=share_key(first),
        )
        key = base_key(first)
        if key is not None:  # now, so that at most one extra copy of a base is ever in memory
            pool.adopt(group, key)
        groups.append(group)
    return groups


def load_model(run: ServedRun, device: torch.device) -> torch.nn.Module:
    """The run's model as its engine runs it: ONNX Runtime on the CPU for an export, else the
    run's weights over its base on `device`."""
    if run.engine == "onnxruntime":
        return OnnxModel(run.run_dir / "model.onnx")
    base = api.base_spec(run.config, run.spec, run.task, device)
    return run.method.load(run.task, base, RunDir(run.run_dir).model, run.config.trust_remote_code)
