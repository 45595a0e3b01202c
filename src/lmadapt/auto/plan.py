"""What `lmadapt auto` knows before any route runs: the task that reads the training file, the
task's profile of the data (examples per label, lengths), a stratified dev set carved out of train
when none is given (written as files in the file's own format, so every route reads the same
dev), and the prompt the prompting routes would use. Every input is checked here (dev and test
labels against train's, the template, the verbalizer's words for every label, the models), so
that nothing the user gave fails once the budget is being spent."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sklearn.model_selection import train_test_split

from lmadapt.data.subset import write_subset
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.models import resolve_model
from lmadapt.prompting.templates import load_template, template_verbalizer
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import DataProfile
from lmadapt.tasks.capabilities import AdaptableTask
from lmadapt.train.config import TrainConfig
from lmadapt.train.loop import checkpoint_metric

if TYPE_CHECKING:  # the protocol only: tasks sit above this module
    from lmadapt.tasks.base import Task

FEW_PER_LABEL = 100
"""Below this many training examples for some label the data counts as few-shot: prompt-based
fine-tuning through the LM head beat a new classifier head on the same model by 0.31 at 16 and
0.14 at 64 per class on SST-2 (bench/results/prompt_ft_vs_head.md)."""
DEV_FRACTION = 0.2
DEV_MAX = 500
"""A carved dev set takes this share of train, at most this many examples: enough to rank the
routes (a standard error of about 2 points of accuracy), cheap to score after every epoch."""
SPEED_ROWS = 200
"""Dev examples the prediction-speed probe of each route predicts (tokenisation included)."""
TARGET_SAMPLES = 10_000
"""Training examples a route aims to see (epochs = this / train size, within the route's
bounds); the Deadline cuts a route that would overrun its share, and the best dev checkpoint is
kept, so more epochs cost time only when the budget has it. At 3,000, 2,000 SST-2 rows used
177 s of a 10-minute budget (2 epochs; bench/results/auto_runs.md)."""


@dataclass
class Plan:
    """What every route reads: the data, its task and profile, the dev split, the prompt."""

    task_section: Any
    task: Task
    profile: DataProfile
    train: Path
    dev: Path
    fmt: str
    metric: str
    mode: str
    prompt: dict[str, Any] | None
    """{'template': ..., 'verbalizer': ...} for the prompting routes, None when they cannot run."""
    prompt_reason: str
    """Why there is no prompt (labels are not words and none was given)."""
    prefer: str
    seed: int
    device: str
    models: dict[str, str] = field(default_factory=dict)
    """Route name -> model, replacing the route's default (tests use tiny models)."""
    done: list[dict[str, Any]] = field(default_factory=list)
    """Leaderboard rows of the routes finished so far (distillation picks its teacher here)."""
    test_rows: int = 0
    """Examples in the test file (0 without one), checked against train's labels."""

    @property
    def single_label_text(self) -> bool:
        return single_label_text(self.task)

    @property
    def few_limit(self) -> int:
        return FEW_PER_LABEL

    @property
    def few(self) -> bool:
        return self.profile.min_per_label < self.few_limit

    def epochs(self, most: int) -> int:
        """Passes over train: TARGET_SAMPLES' worth, 1 to `most`."""
        return max(1, min(most, round(TARGET_SAMPLES / max(1, self.profile.examples))))


def single_label_text(task: Task) -> bool:
    """Whether the task is single-label text classification (what prompting and distillation
    take)."""
    return bool(task.label_distribution and task.shares_backbone)


def adaptable() -> list[str]:
    """The task types `auto` adapts (each an `AdaptableTask`), in registration order."""
    return [e.name for e in TASKS if issubclass(e.impl, AdaptableTask)]


def read_train(path: str | Path, fmt: str, task: str | None) -> tuple[Any, Any, list[Any]]:
    """(task section, task fitted on train, examples) for the named task type; else for the
    adaptable task that recognises the file by its form, else for the first whose reader
    accepts it."""
    names = adaptable()
    if task is not None and task not in names:
        raise ConfigError("--task", f"auto adapts {_listed(names)}, not {task!r}")
    sections = {n: parse_section(TASKS, "type", n, "--task") for n in ([task] if task else names)}
    tasks: dict[str, Any] = {n: build_task(section) for n, section in sections.items()}
    if task is None:
        own = next((n for n, t in tasks.items() if t.recognises(str(path), fmt)), None)
        if own is not None:
            tasks = {own: tasks[own]}
    refusals = []
    for name, t in tasks.items():
        try:
            examples = t.read(str(path), fmt)
        except DataError as e:
            if len(tasks) == 1:  # named, or recognised: the reader's refusal is the file's
                raise
            refusals.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        t.fit(examples)
        return sections[name], t, examples
    raise DataError(
        str(path), "no task reads this file (" + "; ".join(refusals) + "); pass --task TYPE"
    )


def _listed(names: list[str]) -> str:
    """'a, b and c'."""
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def carve_dev(profile: DataProfile, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices), stratified by the profile's strata: DEV_FRACTION of the
    examples, at most DEV_MAX, at least one per stratum. An example alone in its stratum (a
    label seen once) stays in train: in dev it would be a label no route had learned."""
    counts = Counter(profile.strata)
    alone = [i for i, s in enumerate(profile.strata) if counts[s] == 1]
    rest = [i for i, s in enumerate(profile.strata) if counts[s] > 1]
    kinds = sum(1 for c in counts.values() if c > 1)
    size = min(DEV_MAX, max(kinds, round(DEV_FRACTION * len(rest))))
    if not kinds or len(rest) - size < kinds:
        raise DataError(
            "train",
            f"{profile.examples} examples are too few to carve a dev set out of; pass a DEV file",
        )
    tr, dv = train_test_split(
        rest,
        test_size=size,
        stratify=[profile.strata[i] for i in rest],
        random_state=seed,
        shuffle=True,
    )
    return sorted(tr + alone), sorted(dv)


def prompt_recipe(
    labels: list[str], template: Any, verbalizer: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """The template and verbalizer of the prompting routes, or why they cannot run.

    Given a template, its suggested verbalizer (or the given one); without one, labels that are
    words are their own verbalizer under a generic instruction naming them. Numeric labels say
    nothing an LM could score, so the user must name the words (e.g. --template sentiment)."""
    if template is None:
        template = {
            "instruction": f"Classify the text as one of: {', '.join(labels)}.",
            "input": "Text: {text}",
            "output": "Answer: {label}",
        }
        if verbalizer is None:
            if not all(re.fullmatch(r"[A-Za-z][A-Za-z _-]*", name) for name in labels):
                return None, (
                    f"labels {', '.join(labels[:5])} are not words an LM could score; "
                    "pass --template (e.g. sentiment) or --verbalizer"
                )
            verbalizer = {name: name.replace("_", " ") for name in labels}
    elif verbalizer is None:
        verbalizer = template_verbalizer(template) if isinstance(template, str) else None
        if verbalizer is None:
            return None, f"template {template!r} suggests no verbalizer; pass --verbalizer"
    missing = [name for name in labels if name not in verbalizer]
    if missing:
        return None, (
            f"the verbalizer has no word for label(s) {', '.join(missing)} "
            f"(it has words for {', '.join(map(str, verbalizer)) or 'none'}); "
            "pass --verbalizer LABEL=WORD,..."
        )
    return {"template": template, "verbalizer": verbalizer}, ""


def is_hub_id(name: str) -> bool:
    """Whether a model name is a hub id (owner/name, no such local path): resolving it may
    download, so it is left to its route."""
    return (
        bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name))
        and not Path(name).exists()
    )


def check_models(models: dict[str, str]) -> None:
    """Refuse a model that cannot resolve (`--model ROUTE=MODEL`) before any route runs: an
    embedded name, a model directory or .gguf file, or a hub id (owner/name, resolved when its
    route runs: it may download)."""
    for route, name in models.items():
        if is_hub_id(name):
            continue
        try:
            resolve_model(name)
        except LmadaptError as e:
            raise ConfigError("--model", f"{route}={name}: {e}") from None


def _check_prompt(
    template: Any, verbalizer: dict[str, Any] | None, prompt: Any, reason: str
) -> None:
    """A template or verbalizer the user gave must serve: a named template that exists, words
    for every label; without them prompting is skipped, with them it is an error."""
    if isinstance(template, str):
        try:
            load_template(template)
        except ConfigError as e:
            raise ConfigError("--template", e.message) from None
    if prompt is None and (template is not None or verbalizer is not None):
        raise ConfigError("--verbalizer" if verbalizer is not None else "--template", reason)


def make_plan(
    train_file: str | Path,
    dev_file: str | Path | None,
    out: Path,
    *,
    test_file: str | Path | None = None,
    fmt: str = "auto",
    task: str | None = None,
    template: str | dict[str, Any] | None = None,
    verbalizer: dict[str, Any] | None = None,
    prefer: str = "accuracy",
    seed: int = 42,
    device: str = "auto",
    models: dict[str, str] | None = None,
) -> tuple[Plan, dict[str, int] | None, Path]:
    """Read, check and profile the data, carve a dev set into OUT/data when none is given, and
    write the speed probe's file there: (plan, carved split sizes or None, speed file)."""
    section, t, examples = read_train(train_file, fmt, task)
    prompt, prompt_reason = prompt_recipe(list(t.labels), template, verbalizer)
    if single_label_text(t):
        _check_prompt(template, verbalizer, prompt, prompt_reason)
    test_rows = len(t.check(t.read(str(test_file), fmt))) if test_file is not None else 0
    profile = t.profile(examples)
    train_path, carved = Path(train_file), None
    dev_path: str | Path
    suffix = Path(train_file).suffix
    if dev_file is None:
        tr, dv = carve_dev(profile, seed)
        lines = profile.source_lines
        data = out / "data"
        train_path = write_subset(train_file, fmt, [lines[i] for i in tr], data / f"train{suffix}")
        dev_path = write_subset(train_file, fmt, [lines[i] for i in dv], data / f"dev{suffix}")
        carved = {"train": len(tr), "dev": len(dv)}
        profile = t.profile([examples[i] for i in tr])  # what the routes train on
    else:
        dev_path = dev_file
    dev_examples = t.check(t.read(str(dev_path), fmt))
    speed_file = write_subset(
        dev_path,
        fmt,
        t.profile(dev_examples).source_lines[:SPEED_ROWS],
        out / "data" / f"speed{Path(dev_path).suffix}",
    )
    metric, mode = checkpoint_metric(TrainConfig(), t)
    plan = Plan(
        section,
        t,
        profile,
        train_path,
        Path(dev_path),
        fmt,
        metric,
        mode,
        prompt,
        prompt_reason,
        prefer,
        seed,
        device,
        dict(models or {}),
        test_rows=test_rows,
    )
    return plan, carved, speed_file
