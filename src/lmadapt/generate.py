"""Text generation from a finished generation run or a bare causal LM: prompts, files, a chat.

`lmadapt generate`, `lmadapt chat` and `lmadapt evaluate-model` are thin wrappers over these.
A bare model name (no run directory) loads the base model with the generation task's defaults,
so a base model can be tried and scored exactly like a tuned one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from lmadapt.data.chat import Conversation
from lmadapt.decoding import GenerationSettings
from lmadapt.errors import LmadaptError
from lmadapt.io import write_text
from lmadapt.rundir import RunDir
from lmadapt.session import peak_rss_mb, resolve_device, set_threads, start
from lmadapt.tasks.base import check_model_suits
from lmadapt.tasks.configs import GenerationConfig
from lmadapt.tasks.generation import GenerationTask


@dataclass
class Generator:
    """A causal LM, its tokenizer and the generation task that knows its prompt template."""

    name: str
    model: torch.nn.Module
    task: GenerationTask

    def generate(
        self, conversations: list[Conversation], settings: GenerationSettings | None = None
    ) -> list[str]:
        return self.task.generate(self.model, conversations, settings)


def load_generator(
    source: str | Path, trust_remote_code: bool = False, device: str = "auto"
) -> Generator:
    """A run directory of a generation run, or a model name/path (embedded, local, hub id), on
    `device` (resolved before anything loads)."""
    where = resolve_device(device)
    path = Path(source)
    if RunDir(path).run_info.is_file():
        from lmadapt.api import load_run

        run = load_run(path, device)
        if not isinstance(run.task, GenerationTask):
            raise LmadaptError(
                f"{path} is a {run.task.kind} run; generation needs a generation run"
            )
        run.task.template(run.tokenizer)
        return Generator(path.name, run.model, run.task)
    from lmadapt.models import load_tokenizer, resolve_model

    spec = resolve_model(str(source))
    task = GenerationTask(GenerationConfig())
    check_model_suits(task, spec, "model")
    set_threads()
    task.template(load_tokenizer(spec, trust_remote_code))
    model = task.build_model(spec, trust_remote_code)
    model.to(where).eval()
    return Generator(spec.name, model, task)


def _user(text: str, i: int, system: str | None) -> Conversation:
    messages = [{"role": "system", "content": system}] if system else []
    return Conversation([*messages, {"role": "user", "content": text}], file="<input>", line=i)


def generate(
    source: str | Path | Generator,
    prompts: list[str],
    settings: dict[str, Any] | None = None,
    system: str | None = None,
) -> list[str]:
    """Answer each prompt as a single user turn (with an optional system prompt)."""
    gen = source if isinstance(source, Generator) else load_generator(source)
    if not prompts:
        raise LmadaptError("generate needs at least one prompt")
    convs = [_user(p, i + 1, system) for i, p in enumerate(prompts)]
    return gen.generate(convs, gen.task.settings(**(settings or {})))


def generate_file(
    source: str | Path | Generator,
    path: str | Path,
    out: str | Path,
    settings: dict[str, Any] | None = None,
    fmt: str = "auto",
) -> int:
    """Generate for every record of a data file (any format the task reads) into JSONL:
    prompt, output, and the reference when the record has one. Returns the row count."""
    gen = source if isinstance(source, Generator) else load_generator(source)
    examples = gen.task.read(str(path), fmt, labelled=False)
    outputs = gen.generate(examples, gen.task.settings(**(settings or {})))
    lines = []
    for ex, output in zip(examples, outputs):
        prompt = ex.text if ex.text is not None else ex.prompt_messages[-1]["content"]
        row: dict[str, Any] = {"line": ex.line, "prompt": prompt, "output": output}
        if ex.reference is not None:
            row["reference"] = ex.reference
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(out, "".join(lines))
    return len(lines)


def chat(
    source: str | Path | Generator,
    stdin: TextIO,
    stdout: TextIO,
    settings: dict[str, Any] | None = None,
    system: str | None = None,
    device: str = "auto",
) -> list[dict[str, str]]:
    """Interactive session: each input line is a user turn answered with the whole history.

    `/exit` (or end of input) ends it, `/reset` forgets the history. Returns the transcript.
    `device` applies when the model is loaded here.
    """
    gen = source if isinstance(source, Generator) else load_generator(source, device=device)
    decode = gen.task.settings(**(settings or {}))
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = stdin.isatty()
    stdout.write(f"chatting with {gen.name}; /reset clears the history, /exit quits\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            continue
        history.append({"role": "user", "content": text})
        (reply,) = gen.generate([Conversation(list(history), file="<chat>")], decode)
        history.append({"role": "assistant", "content": reply})
        stdout.write(reply + "\n")
        stdout.flush()
    return history


def evaluate_base(
    config: str | Path,
    overrides: list[str] | None = None,
    model: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Score a model that has not been tuned (or a finished run) on a run config's dev and test
    data, with the config's task settings: the "before" column next to a run's metrics.json.

    `model` is a model name/path or a run directory; None takes the config's base model. It runs
    on `device` (refused before the data is read when the machine lacks it).
    """
    where = resolve_device(device)
    from lmadapt.api import base_spec, load_run, prepare
    from lmadapt.config import load_config

    cfg = load_config(config, overrides)
    run_dir = Path(model) if model and RunDir(model).run_info.is_file() else None
    if model and run_dir is None:
        cfg.model = model
    start(cfg.train.threads, cfg.train.seed)
    t0 = time.perf_counter()
    data = prepare(cfg)
    if run_dir:
        net = load_run(run_dir, device).model
    else:  # the base as a run of this config starts from it (quantised under `quantize`)
        net = data.task.build_model(base_spec(cfg, data.spec, data.task, where))
    net.to(where)
    result: dict[str, Any] = {"model": str(run_dir or data.spec.name), "config": str(config)}
    splits = data.eval_splits(data.task.collator(data.tokenizer), cfg.train.eval_batch_size)
    for split, encoded in splits.items():
        ev = data.task.evaluate_model(net, encoded)
        result[split] = ev.metrics
        result[f"{split}_samples"] = ev.details.get("samples", [])
    if "dev" not in result and "test" not in result:
        raise LmadaptError(f"{config}: no data.dev or data.test to evaluate on")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


__all__ = ["Generator", "chat", "evaluate_base", "generate", "generate_file", "load_generator"]
