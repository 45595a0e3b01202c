"""`lmadapt auto`: pick the adaptation route that fits the data, within a time budget.

It reads the training file with the task that accepts it (or the one named), asks the task to
describe the data (`DataProfile`: examples per label, lengths), carves a stratified dev set out of
train when none is given (written as files, so every route reads the same dev; a test file is
never used for selection and is scored for the winner only), then runs the routes that fit,
cheapest first, each an ordinary `lmadapt.api.train` run (distillation: `run_distill`) with a
`Deadline` hook that stops the one training loop when the route's share of the budget is spent.
The best dev metric wins; its run directory is moved to OUT/winner, where predict, serve and
export read it as they read any run. report.md and leaderboard.json list every route: its dev
metric, training time, prediction speed, artifact size and status (or why it was skipped).

The budget bounds training; loading, the final evaluation and the speed probe of the route
running when it ends come on top (each route keeps a quarter of its share for them).
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sklearn.model_selection import train_test_split

from lmadapt.api import evaluate, load_run, predict, train
from lmadapt.compare import dir_bytes
from lmadapt.config import TrainConfig, build_run_config
from lmadapt.data.subset import write_subset
from lmadapt.errors import ConfigError, DataError, LmadaptError
from lmadapt.evaluate.report import markdown_table
from lmadapt.hooks import Hook
from lmadapt.io import write_json, write_text
from lmadapt.prompting.templates import template_verbalizer
from lmadapt.registry import Registry
from lmadapt.rundir import check_output_dir
from lmadapt.schema import parse_section, to_dict
from lmadapt.session import run_directory
from lmadapt.tasks import TASKS, build_task
from lmadapt.tasks.base import DataProfile
from lmadapt.train.loop import Trainer, TrainingInterrupted, checkpoint_metric, linear_factor

INFERRED = ("token_classification", "classification")
"""Task types `auto` tells apart by reading the file: the first whose reader accepts it wins.
Tagged sentences come first: a CoNLL file is no table, and a table has no tokens and tags."""
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
RESERVE = 0.25
"""Share of a route's time kept for loading, the final evaluation and the speed probe."""
PROBE_STEPS = 10
"""Steps a Deadline times before it estimates how many steps the route's time allows."""
TARGET_SAMPLES = 3000
"""Training examples a route aims to see (epochs = this / train size, within the route's
bounds): a few thousand steps' worth of samples converge the shipped recipes on small sets."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([hms]?)")
_UNITS = {"h": 3600, "m": 60, "s": 1, "": 1}


def parse_budget(budget: str | float) -> float:
    """Seconds in a budget: a number of seconds or a duration like '90s', '10m', '1h', '1h30m'."""
    if isinstance(budget, (int, float)):
        seconds = float(budget)
    else:
        text = budget.strip().lower()
        parts = list(_DURATION.finditer(text))
        if not parts or "".join(m.group(0) for m in parts).replace(" ", "") != text.replace(
            " ", ""
        ):
            raise ConfigError("--budget", f"expected e.g. 90s, 10m, 1h or 1h30m, got {budget!r}")
        seconds = sum(float(m.group(1)) * _UNITS[m.group(2)] for m in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError("--budget", f"must be a positive duration, got {budget!r}")
    return seconds


class Deadline(Hook):
    """Fits training into the time up to `at` (time.monotonic()).

    After PROBE_STEPS steps it estimates how many steps the time allows; when that is fewer
    than the schedule's, the learning rate is re-scheduled to decay to 0 at that step (a
    schedule cut off halfway would end at a high rate). It then stops the loop at the first
    step boundary past `at`; checked before the first step too, so a deadline already passed
    trains nothing and the loop only evaluates (and keeps) the untrained weights."""

    def __init__(self, at: float):
        self.at = at
        self.fired = False
        self.rescheduled_to: int | None = None
        """The step the learning rate now decays to, when the deadline shortened the run."""
        self._start = (0.0, 0)

    def _check(self, trainer: Trainer) -> None:
        if time.monotonic() >= self.at:
            self.fired = True
            trainer.state.should_stop = True

    def on_train_start(self, trainer: Trainer) -> None:
        self._start = (time.monotonic(), trainer.state.step)
        self._check(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        self._check(trainer)
        t0, step0 = self._start
        step = trainer.state.step
        if self.rescheduled_to is not None and step >= self.rescheduled_to:
            self.fired = trainer.state.should_stop = True  # the rate is 0 from here on
        if step - step0 != PROBE_STEPS:
            return
        now = time.monotonic()
        reachable = step + int((self.at - now) / ((now - t0) / PROBE_STEPS))
        if reachable < trainer.total_steps():
            warmup = int(trainer.cfg.warmup_ratio * reachable)
            groups = len(trainer.scheduler.lr_lambdas)  # one multiplier per parameter group
            trainer.scheduler.lr_lambdas = [linear_factor(warmup, reachable)] * groups
            self.rescheduled_to = max(reachable, step + 1)


# ---------------------------------------------------------------------- what the routes see


@dataclass
class Plan:
    """What every route reads: the data, its task and profile, the dev split, the prompt."""

    task_section: Any
    task: Any
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

    @property
    def few(self) -> bool:
        return self.profile.min_per_label < FEW_PER_LABEL

    def epochs(self, most: int) -> int:
        """Passes over train: TARGET_SAMPLES' worth, 1 to `most`."""
        return max(1, min(most, round(TARGET_SAMPLES / max(1, self.profile.examples))))


@dataclass
class Outcome:
    metrics: dict[str, Any]
    """The run's metrics.json content."""
    budget_stop: bool
    """Whether the Deadline ended training (after some steps)."""


class Route:
    """One way to adapt a model to the data. Subclasses say when they fit and how they run."""

    model = ""
    """Default model (`Plan.models` may replace it)."""
    method = ""
    min_seconds = 20.0
    """Rough wall seconds to load, evaluate and save with nothing trained on a 2-core CPU; a
    route left less than this of the budget is skipped rather than started."""
    teaches = False
    """Whether its run can be a distillation teacher (a classifier head's logits)."""

    def __init__(self, name: str):
        self.name = name
        """The name it is registered under (what `Plan.models` and the leaderboard use)."""

    def unfit(self, plan: Plan) -> str | None:
        """Why the route does not fit the data (None when it does)."""
        raise NotImplementedError

    def run(self, plan: Plan, run_dir: Path, until: float) -> Outcome:
        raise NotImplementedError


ROUTES: Registry[type[Route]] = Registry("route")
"""In running order, cheapest first."""


class TrainedRoute(Route):
    """A route that is one `lmadapt.api.train` run, stopped by a Deadline."""

    def task(self, plan: Plan) -> dict[str, Any]:
        return to_dict(plan.task_section)

    def method_section(self, plan: Plan) -> dict[str, Any]:
        return {"name": self.method}

    def train_section(self, plan: Plan) -> dict[str, Any]:
        raise NotImplementedError

    def data_section(self, plan: Plan) -> dict[str, Any]:
        return {}

    def deadline(self, until: float) -> Deadline:
        return Deadline(until)

    def run(self, plan: Plan, run_dir: Path, until: float) -> Outcome:
        config = build_run_config(
            {
                "model": plan.models.get(self.name, self.model),
                "task": self.task(plan),
                "method": self.method_section(plan),
                "data": {
                    "train": str(plan.train),
                    "dev": str(plan.dev),
                    "format": plan.fmt,
                    **self.data_section(plan),
                },
                "train": {"seed": plan.seed, "metric": plan.metric, **self.train_section(plan)},
                "output_dir": str(run_dir),
                "device": plan.device,
            }
        )
        hook = self.deadline(until)
        metrics = train(config, hooks=[hook])
        return Outcome(metrics, hook.fired and metrics["steps"] > 0)


class PromptRoute(TrainedRoute):
    """Routes through an LM's own head (task prompt_classification): they need a template and a
    verbalizer word per label, and single-label text classification."""

    model = "smollm2-135m-instruct"

    def unfit(self, plan: Plan) -> str | None:
        if not (plan.task.label_distribution and plan.task.shares_backbone):
            return f"prompting classifies single-label text; this is {plan.task.description}"
        if plan.prompt is None:
            return plan.prompt_reason
        return None

    def task(self, plan: Plan) -> dict[str, Any]:
        return {"type": "prompt_classification", **(plan.prompt or {})}


@ROUTES.register("zero_shot")
class ZeroShot(PromptRoute):
    """Zero-shot prompting: the pretrained LM scores each label's verbalizer word, nothing is
    trained. It is a train run stopped before its first step (a LoRA adapter starts as the
    identity), so the result is an ordinary run directory that predict and serve load."""

    method = "lora"
    min_seconds = 30.0

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {"max_steps": 1, "batch_size": 8, "eval_batch_size": 32}

    def data_section(self, plan: Plan) -> dict[str, Any]:
        # nothing trains: a few rows instead of templating and tokenizing all of train
        return {"max_train_samples": 8}

    def deadline(self, until: float) -> Deadline:
        return Deadline(-math.inf)  # trains nothing, whatever the budget


@ROUTES.register("lora")
class HeadLora(TrainedRoute):
    """LoRA (r 16 on every linear layer, lr 1e-3, as the shipped sst2/conll recipes) on MiniLM
    with a new head: the cheap trained route for any amount of data."""

    model = "minilm"
    method = "lora"
    teaches = True

    def unfit(self, plan: Plan) -> str | None:
        return None if "encoder" in plan.task.model_kinds else "the task takes no encoder"

    def method_section(self, plan: Plan) -> dict[str, Any]:
        return {"name": "lora", "r": 16, "alpha": 32, "target_modules": ["all-linear"], "lr": 1e-3}

    def train_section(self, plan: Plan) -> dict[str, Any]:
        # dropout 0: 1.35x faster on CPU at equal accuracy (configs/sst2_lora.yaml)
        batch = 8 if plan.few else 32
        return {"epochs": plan.epochs(20), "batch_size": batch, "dropout": 0.0}


@ROUTES.register("full")
class HeadFull(HeadLora):
    """Full fine-tuning of MiniLM with a new head: every weight trains, so it needs many
    examples per label (below FEW_PER_LABEL it overfits what LoRA does not)."""

    method = "full"

    def unfit(self, plan: Plan) -> str | None:
        if plan.few:
            return (
                f"few examples per label ({plan.profile.min_per_label} < {FEW_PER_LABEL}): "
                "full fine-tuning overfits them"
            )
        return super().unfit(plan)

    def method_section(self, plan: Plan) -> dict[str, Any]:
        return {"name": "full"}

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {"epochs": plan.epochs(10), "batch_size": 32}


@ROUTES.register("prompt_ft")
class PromptFinetune(PromptRoute):
    """Prompt-based fine-tuning (PET / LM-BFF) of SmolLM2 with LoRA: the strongest route with
    few examples per label (0.86 on SST-2 at 16 per class, bench/results), too slow on a CPU to
    be worth it with many (the head routes then learn as well from the data)."""

    method = "lora"
    min_seconds = 60.0

    def unfit(self, plan: Plan) -> str | None:
        if not plan.few:
            return (
                f"many examples per label ({plan.profile.min_per_label} >= {FEW_PER_LABEL}): "
                "the head routes learn as well, faster"
            )
        return super().unfit(plan)

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {"epochs": plan.epochs(10), "batch_size": 8, "eval_batch_size": 32}


@ROUTES.register("distill")
class Distill(Route):
    """Only with prefer='speed': the best head classifier found so far taught to the first half
    of MiniLM's blocks (3 of 6), trained in full with `run_distill`."""

    model = "minilm"
    method = "full"

    def unfit(self, plan: Plan) -> str | None:
        if plan.prefer != "speed":
            return "only with --prefer speed"
        if not (plan.task.label_distribution and plan.task.shares_backbone):
            what = plan.task.description
            return f"distillation takes single-label classification; this is {what}"
        return None

    def run(self, plan: Plan, run_dir: Path, until: float) -> Outcome:
        from transformers import AutoConfig

        from lmadapt.distill import run_distill
        from lmadapt.distill.runner import build_distill_config
        from lmadapt.models import resolve_model

        teachers = [r for r in plan.done if r["teaches"] and r["status"] in OK]
        if not teachers:
            raise _Skip("no finished head classifier to teach the student")
        teacher = _best(teachers, plan.mode)
        model = plan.models.get(self.name, self.model)
        blocks = AutoConfig.from_pretrained(resolve_model(model).path).num_hidden_layers
        config = build_distill_config(
            {
                "teacher": {"type": "run", "run_dir": teacher["run_dir"]},
                "student_layers": max(1, blocks // 2),
                "model": model,
                "task": to_dict(plan.task_section),
                "method": {"name": "full"},
                "data": {"train": str(plan.train), "dev": str(plan.dev), "format": plan.fmt},
                "train": {"epochs": plan.epochs(10), "batch_size": 32, "seed": plan.seed},
                "output_dir": str(run_dir),
                "device": plan.device,
            }
        )
        hook = Deadline(until)
        metrics = run_distill(config, hooks=[hook])
        return Outcome(metrics, hook.fired and metrics["steps"] > 0)


class _Skip(Exception):
    """A route found, once its turn came, that it cannot run (the reason is its message)."""


OK = ("done", "stopped at its time share")


# ---------------------------------------------------------------------- data


def read_train(path: str | Path, fmt: str, task: str | None) -> tuple[Any, Any, list[Any]]:
    """(task section, task fitted on train, examples) for the named task type, or the first of
    INFERRED whose reader accepts the file."""
    names = [task] if task else list(INFERRED)
    refusals = []
    for name in names:
        if name not in INFERRED:
            raise ConfigError("--task", f"auto adapts {' and '.join(INFERRED)}, not {name!r}")
        section = parse_section(TASKS, "type", name, "--task")
        t = build_task(section)
        try:
            examples = t.read(str(path), fmt)
        except DataError as e:
            if task:
                raise
            refusals.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        t.fit(examples)
        return section, t, examples
    raise DataError(
        str(path), "no task reads this file (" + "; ".join(refusals) + "); pass --task TYPE"
    )


def carve_dev(profile: DataProfile, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, dev indices), stratified by the profile's strata: DEV_FRACTION of the
    examples, at most DEV_MAX, at least one per stratum. Strata with a single example cannot be
    split in proportion and join a common 'rare' stratum."""
    n = profile.examples
    counts = Counter(profile.strata)
    strata = [s if counts[s] > 1 else "\x00rare" for s in profile.strata]
    merged = Counter(strata)
    kinds = len(merged)
    size = min(DEV_MAX, max(kinds, round(DEV_FRACTION * n)))
    if n - size < kinds:
        raise DataError(
            "train", f"{n} examples are too few to carve a dev set out of; pass a DEV file"
        )
    stratify = strata if min(merged.values()) > 1 else None  # a lone rare example: unstratified
    tr, dv = train_test_split(
        list(range(n)), test_size=size, stratify=stratify, random_state=seed, shuffle=True
    )
    return sorted(tr), sorted(dv)


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
            return None, "the template suggests no verbalizer; pass --verbalizer"
    missing = [name for name in labels if name not in verbalizer]
    if missing:
        return None, f"the verbalizer has no word for label(s) {', '.join(missing)}"
    return {"template": template, "verbalizer": verbalizer}, ""


# ---------------------------------------------------------------------- the command


def auto(
    train_file: str | Path,
    dev_file: str | Path | None = None,
    budget: str | float = "10m",
    out: str | Path = "runs/auto",
    test_file: str | Path | None = None,
    task: str | None = None,
    prefer: Literal["accuracy", "speed"] = "accuracy",
    template: str | dict[str, Any] | None = None,
    verbalizer: dict[str, Any] | None = None,
    models: dict[str, str] | None = None,
    fmt: str = "auto",
    seed: int = 42,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the routes that fit the data within `budget`, keep the best by dev metric in
    OUT/winner (an ordinary run directory) and write report.md and leaderboard.json to `out`;
    returns the leaderboard. `models` maps route names to models replacing their defaults;
    `template`/`verbalizer` give the prompting routes their words (see `prompt_recipe`)."""
    seconds = parse_budget(budget)
    end = time.monotonic() + seconds
    if prefer not in ("accuracy", "speed"):
        raise ConfigError("--prefer", f"must be accuracy or speed, got {prefer!r}")
    unknown = sorted(set(models or {}) - set(ROUTES.names()))
    if unknown:
        raise ConfigError("models", f"unknown route(s) {unknown}; one of {ROUTES.names()}")
    for path in (train_file, dev_file, test_file):
        if path is not None and not Path(path).is_file():
            raise DataError(str(path), "no such file")
    out = check_output_dir(out, overwrite, "--out", "--overwrite", "--overwrite")
    with run_directory(out, "auto"):
        plan, carved, speed_file = make_plan(
            train_file,
            dev_file,
            out,
            fmt=fmt,
            task=task,
            template=template,
            verbalizer=verbalizer,
            prefer=prefer,
            seed=seed,
            device=device,
            models=models or {},
        )
        t, profile, metric, mode = plan.task, plan.profile, plan.metric, plan.mode
        speed_rows = len(plan.task.read(str(speed_file), fmt, labelled=False))
        rows = _run_routes(plan, out, end, speed_file)
        ok = [r for r in rows if r["status"] in OK]
        winner = _best(ok, mode) if ok else None
        test = None
        if winner is not None:
            dest = out / "winner"
            shutil.move(winner["run_dir"], dest)
            winner["run_dir"] = str(dest)
            if test_file is not None:
                test = evaluate(dest, test_file, fmt, device)[0].metrics
        result = {
            "train": str(train_file),
            "dev": str(dev_file) if dev_file else None,
            "carved": carved,
            "test": str(test_file) if test_file else None,
            "task": t.description,
            "profile": profile.to_dict(),
            "budget_seconds": seconds,
            "wall_seconds": round(seconds - (end - time.monotonic()), 1),
            "metric": metric,
            "direction": mode,
            "prefer": prefer,
            "speed_rows": speed_rows,
            "winner": winner and winner["route"],
            "winner_dir": winner and winner["run_dir"],
            "test_metrics": test,
            "rows": _ranked(rows, mode),
        }
        write_json(out / "leaderboard.json", result)
        write_text(out / "report.md", markdown(result, plan))
    if winner is None:
        raise LmadaptError(f"no route finished within the budget; see {out / 'report.md'}")
    return result


def make_plan(
    train_file: str | Path,
    dev_file: str | Path | None,
    out: Path,
    *,
    fmt: str = "auto",
    task: str | None = None,
    template: str | dict[str, Any] | None = None,
    verbalizer: dict[str, Any] | None = None,
    prefer: str = "accuracy",
    seed: int = 42,
    device: str = "auto",
    models: dict[str, str] | None = None,
) -> tuple[Plan, dict[str, int] | None, Path]:
    """Read and profile the data, carve a dev set into OUT/data when none is given, and write
    the speed probe's file there: (plan, carved split sizes or None, speed file)."""
    section, t, examples = read_train(train_file, fmt, task)
    profile = t.profile(examples)
    train_path, dev_path, carved = Path(train_file), dev_file, None
    suffix = Path(train_file).suffix
    if dev_file is None:
        tr, dv = carve_dev(profile, seed)
        lines = profile.source_lines
        data = out / "data"
        train_path = write_subset(train_file, fmt, [lines[i] for i in tr], data / f"train{suffix}")
        dev_path = write_subset(train_file, fmt, [lines[i] for i in dv], data / f"dev{suffix}")
        carved = {"train": len(tr), "dev": len(dv)}
        profile = t.profile([examples[i] for i in tr])  # what the routes train on
    dev_examples = t.check(t.read(str(dev_path), fmt))
    speed_file = write_subset(
        dev_path,
        fmt,
        t.profile(dev_examples).source_lines[:SPEED_ROWS],
        out / "data" / f"speed{Path(dev_path).suffix}",
    )
    metric, mode = checkpoint_metric(TrainConfig(), t)
    prompt, prompt_reason = prompt_recipe(list(t.labels), template, verbalizer)
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
    )
    return plan, carved, speed_file


def fitting_routes(plan: Plan) -> list[str]:
    """The routes that fit the data, in running order."""
    return [e.name for e in ROUTES if e.impl(e.name).unfit(plan) is None]


def _run_routes(plan: Plan, out: Path, end: float, speed_file: Path) -> list[dict[str, Any]]:
    """Every route in order: skipped with its reason, or run within its share of what is left
    (what is left divided among the fitting routes still to run)."""
    rows = []
    routes = [(e.name, e.impl(e.name)) for e in ROUTES]
    fitting = fitting_routes(plan)
    for name, route in routes:
        row = {
            "route": name,
            "model": plan.models.get(name, route.model),
            "method": route.method,
            "teaches": route.teaches,
        }
        rows.append(row)
        why = route.unfit(plan)
        if why is not None:
            row.update(status="skipped", reason=why)
            continue
        left = end - time.monotonic()
        if left < route.min_seconds:
            row.update(
                status="skipped",
                reason=f"{left:.0f}s of the budget left; it needs about {route.min_seconds:.0f}s",
            )
            fitting.remove(name)
            continue
        share = left / len(fitting)
        fitting.remove(name)
        run_dir = out / "routes" / name
        print(f"[auto] {name}: up to {share:.0f}s ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            outcome = route.run(plan, run_dir, time.monotonic() + share * (1 - RESERVE))
            speed = _predict_speed(run_dir, speed_file, plan.device)  # also: it reloads
        except _Skip as e:
            row.update(status="skipped", reason=str(e))
            continue
        except (TrainingInterrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # one failing route must not lose the others
            first = (str(e).splitlines() or [""])[0]
            row.update(status="failed", reason=f"{type(e).__name__}: {first}")
            (out / "routes").mkdir(exist_ok=True)
            write_text(out / "routes" / f"{name}.error.txt", traceback.format_exc())
            continue
        m = outcome.metrics
        row.update(
            status="stopped at its time share" if outcome.budget_stop else "done",
            reason="",
            run_dir=str(run_dir),
            dev_metric=m["dev"][plan.metric],
            dev_loss=m["dev"].get("loss"),  # distillation reports none
            steps=m["steps"],
            train_seconds=m["train_seconds"],
            predict_per_second=round(speed, 1),
            size_mb=round(dir_bytes(run_dir / "model") / 2**20, 2),
            wall_seconds=round(time.monotonic() - t0, 1),
        )
        plan.done.append(row)
        print(
            f"[auto] {name}: dev {plan.metric} {row['dev_metric']:.4f} ({row['wall_seconds']}s)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _predict_speed(run_dir: Path, speed_file: Path, device: str) -> float:
    """Examples per second of `lmadapt predict` on the speed file, loading excluded (it also
    proves the run reloads)."""
    loaded = load_run(run_dir, device)
    t0 = time.perf_counter()
    n = len(predict(loaded, file=speed_file))
    return n / max(time.perf_counter() - t0, 1e-9)


def _best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best dev metric. Ties are common on a small dev set (accuracy moves in steps of
    1/n): the lower dev loss breaks them, then the earlier (cheaper) route."""
    sign = 1 if mode == "max" else -1

    # max keeps the first of equals
    def key(r: dict[str, Any]) -> tuple[float, float]:
        return sign * r["dev_metric"], -(math.inf if r["dev_loss"] is None else r["dev_loss"])

    return max(rows, key=key)


def _ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    ok = [r for r in rows if r["status"] in OK]
    ranked = []
    while ok:
        best = _best(ok, mode)
        ok.remove(best)
        ranked.append(best)
    return ranked + [r for r in rows if r["status"] not in OK]


def markdown(result: dict[str, Any], plan: Plan) -> str:
    metric = result["metric"]
    p = result["profile"]
    counts = ", ".join(f"{k} {v:,}" for k, v in p["label_counts"].items())
    dev = (
        f"`{result['dev']}`"
        if result["dev"]
        else f"carved from train, stratified: {result['carved']['dev']:,} examples "
        f"(train keeps {result['carved']['train']:,}; `data/`)"
    )
    lines = [
        "# lmadapt auto",
        "",
        f"- **data**: `{result['train']}`, {result['task']}, {p['examples']:,} training examples "
        f"({'few' if plan.few else 'many'} per label: {counts}); "
        f"{p['mean_words']} words on average, {p['max_words']} at most",
        f"- **dev**: {dev}",
        f"- **selection**: dev {metric} ({result['direction']}); test never read for it",
        f"- **budget**: {result['budget_seconds']:.0f}s, used {result['wall_seconds']:.0f}s; "
        f"prefer {result['prefer']}",
    ]
    if result["winner"]:
        lines.append(f"- **winner**: {result['winner']} -> `{result['winner_dir']}`")
    lines += ["", "## Leaderboard", ""]
    rows = []
    for i, r in enumerate(result["rows"], 1):
        if r["status"] in OK:
            rows.append(
                [
                    i,
                    r["route"],
                    r["model"],
                    r["method"],
                    f"{r['dev_metric']:.4f}",
                    f"{r['train_seconds']:.0f}s ({r['steps']} steps)",
                    f"{r['predict_per_second']:.1f}",
                    f"{r['size_mb']:.1f}",
                    r["status"],
                ]
            )
        else:
            rows.append(["-", r["route"], r["model"], r["method"], "-", "-", "-", "-", _status(r)])
    lines.append(
        markdown_table(
            [
                "rank",
                "route",
                "model",
                "method",
                f"dev {metric}",
                "train time",
                "predict ex/s",
                "size MB",
                "status",
            ],
            rows,
        )
    )
    lines += [
        "",
        "Predict speed: `lmadapt predict` on "
        f"{result['speed_rows']} dev examples, tokenisation included, loading excluded. Size: "
        "the run's "
        "model/ directory (an adapter with its base named, or every weight).",
    ]
    if result["test_metrics"]:
        t = result["test_metrics"]
        lines += [
            "",
            f"## Winner on test (`{result['test']}`)",
            "",
            markdown_table(list(t), [[f"{v:.4f}" for v in t.values()]]),
        ]
    if result["winner"]:
        w = result["winner_dir"]
        lines += [
            "",
            "## Use the winner",
            "",
            "```",
            f'lmadapt predict {w} "some text"',
            f"lmadapt serve {w}",
            f"lmadapt export {w} --merge {w}-merged",
            "```",
        ]
    return "\n".join(lines) + "\n"


def _status(row: dict[str, Any]) -> str:
    reason = row["reason"].replace("|", "/")
    return f"{row['status']}: {reason}"


__all__ = ["ROUTES", "Deadline", "auto", "parse_budget"]
