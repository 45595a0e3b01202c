"""The routes `lmadapt auto` can take, one class each, registered in running order (cheapest
first). A route says whether it fits the data (`unfit` gives the reason it does not) and runs as
one ordinary training run (`lmadapt.api.train`, or `run_distill`) with a `Deadline` hook that
fits it into its share of the budget."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmadapt.api import train
from lmadapt.auto.plan import Plan
from lmadapt.config import build_run_config
from lmadapt.hooks import Hook
from lmadapt.registry import Registry
from lmadapt.schema import to_dict
from lmadapt.train.loop import Trainer, linear_factor

PROBE_STEPS = 10
"""Steps a Deadline times before it estimates how many steps the route's time allows."""


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

    def favoured(self, plan: Plan) -> bool:
        """Whether the route wins a tie on the dev metric (see `best`): what is known of it
        for this kind of data, before anything else."""
        return False


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
                f"few examples per label ({plan.profile.min_per_label} < {plan.few_limit}): "
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
                f"many examples per label ({plan.profile.min_per_label} >= {plan.few_limit}): "
                "the head routes learn as well, faster"
            )
        return super().unfit(plan)

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {"epochs": plan.epochs(10), "batch_size": 8, "eval_batch_size": 32}

    def favoured(self, plan: Plan) -> bool:
        # a carved dev set of few examples ties often (SST-2 at 16 per class: 6 examples, LoRA
        # and prompt FT both 1.0; test 0.607 for the LoRA head that won on dev loss)
        return plan.few


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
            raise Skip("no finished head classifier to teach the student")
        teacher = best(teachers, plan.mode)
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


class Skip(Exception):
    """A route found, once its turn came, that it cannot run (the reason is its message)."""


OK = ("done", "stopped at its time share")
"""Statuses of a route that finished: its run is ranked on the leaderboard."""


def fitting_routes(plan: Plan) -> list[str]:
    """The routes that fit the data, in running order."""
    return [e.name for e in ROUTES if e.impl(e.name).unfit(plan) is None]


def best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best dev metric. Ties are common on a small dev set (accuracy moves in steps of
    1/n): a route `favoured` for the data breaks them, then the lower dev loss, then the
    earlier (cheaper) route."""
    sign = 1 if mode == "max" else -1

    def key(r: dict[str, Any]) -> tuple[float, bool, float]:
        loss = math.inf if r["dev_loss"] is None else r["dev_loss"]
        return sign * r["dev_metric"], r.get("favoured", False), -loss

    return max(rows, key=key)  # max keeps the first of equals
