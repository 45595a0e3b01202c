"""The routes `lmadapt auto` can take, one class each, registered in running order (cheapest
first). A route says whether it fits the data (`unfit` gives the reason it does not) and runs as
one ordinary training run (`lmadapt.api.train`, or `run_distill`) with a `Deadline` hook that
fits it into its share of the budget; `time_limit` stops whatever the hook cannot (loading, a
route that hangs or fails slowly)."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmadapt.api import train
from lmadapt.auto.plan import Plan, is_hub_id
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.hooks import Hook
from lmadapt.inference import Encoded
from lmadapt.models import resolve_model
from lmadapt.registry import Registry
from lmadapt.schema import to_dict
from lmadapt.tasks import TASKS
from lmadapt.train.loop import Trainer, linear_factor

PROBE_STEPS = 10
"""Steps a Deadline times before it estimates how many steps the route's time allows."""
EVAL_SHARE = 0.25
"""At most this share of a training route's time goes to scoring dev (the evaluation that may
straddle the deadline, the loop's final one and the report's); a larger dev set is sampled down
to what fits. A route that trains nothing (zero-shot) may spend the rest, 1 - EVAL_SHARE, of its
time scoring (what is left absorbs a misestimate)."""
EVALS_AFTER = 3
"""Dev scorings that can come after a training route's deadline: an epoch's evaluation begun
just before it, the loop's final one, and the report's (the report's alone when nothing trains:
two then)."""


class OutOfTime(BaseException):
    """Raised by `time_limit`. A BaseException, as KeyboardInterrupt is, so that library code
    catching Exception does not swallow it."""


@contextlib.contextmanager
def time_limit(at: float) -> Iterator[None]:
    """Raise OutOfTime in the body once time.monotonic() passes `at`, and each second after in
    case something swallowed it: this bounds what no hook reaches (loading a model, scoring a
    test file, a route failing slowly). It uses SIGALRM, so it only bounds the main thread of a
    POSIX process; elsewhere the body runs unbounded. The SIGINT handler is restored on the way
    out, whatever the body left set (the loop's deferred Ctrl-C, if it was cut short)."""
    main = threading.current_thread() is threading.main_thread()
    if not (main and hasattr(signal, "setitimer")):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise OutOfTime

    alarm = signal.signal(signal.SIGALRM, fire)
    interrupt = signal.getsignal(signal.SIGINT)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.monotonic(), 1e-3), 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if alarm is None else alarm)
        signal.signal(signal.SIGINT, signal.default_int_handler if interrupt is None else interrupt)


class Deadline(Hook):
    """Fits training, and the dev scoring after it, into the time up to `end` (time.monotonic()).

    Training stops at `at` (-inf: trains nothing, the loop only evaluates and keeps the
    untrained weights), or earlier when the route must be done by `end`: at the start it times
    the scoring of one batch of dev, samples dev down to the rows whose scorings fit (keeping
    `after` seconds, plus as long again as loading took, for what the caller does once the run
    is saved: reloading it) and moves `at` to leave time for the scorings after it. After
    PROBE_STEPS steps it estimates how many steps the time allows; when that is fewer than the
    schedule's, the learning rate is re-scheduled to decay to 0 at that step (a schedule cut off
    halfway would end at a high rate). It stops the loop at the first step boundary past `at`."""

    def __init__(
        self, at: float, end: float = math.inf, started: float | None = None, after: float = 0.0
    ):
        self.at, self.end, self.after = at, end, after
        self.started = time.monotonic() if started is None else started
        """When the route began: the time to its first step is about what reloading costs."""
        self.fired = False
        self.rescheduled_to: int | None = None
        """The step the learning rate now decays to, when the deadline shortened the run."""
        self.dev_rows: tuple[int, int] | None = None
        """(examples scored, examples in dev) when dev was sampled down to fit the time."""
        self._start = (0.0, 0)

    def _check(self, trainer: Trainer) -> None:
        if time.monotonic() >= self.at:
            self.fired = True
            trainer.state.should_stop = True

    def on_train_start(self, trainer: Trainer) -> None:
        if math.isfinite(self.end) and trainer.dev_features:
            if trainer.dev_examples is None:  # the task scores against the examples' references
                raise ValueError("Trainer: dev_features were given without their dev_examples")
            self._fit_dev(trainer, trainer.dev_features, trainer.dev_examples)
        self._start = (time.monotonic(), trainer.state.step)
        self._check(trainer)

    def _fit_dev(self, trainer: Trainer, feats: list[dict[str, Any]], examples: list[Any]) -> None:
        """Sample dev (the trainer's `feats` and `examples`) down to what its scorings can take
        of the time, in place: the loop and the run's report read the same lists. Whole
        examples are kept or dropped, with all their features (an NER sentence or a SQuAD
        context may be several windows)."""
        counts = trainer.task.feature_counts(examples)
        starts = [0, *itertools.accumulate(counts)]
        t0 = time.monotonic()
        batch = trainer.cfg.eval_batch_size  # the probe: the first examples that fill a batch
        first = next((i for i, s in enumerate(starts) if s >= batch), len(examples))
        probe = Encoded(feats[: starts[first]], examples[:first], trainer.collator, batch)
        trainer.task.evaluate_model(trainer.model, probe)
        now = time.monotonic()
        per_feature = max(now - t0, 1e-6) / starts[first]
        # kept for after the run: reloading it (about what loading took) and `after`
        after = (t0 - self.started) + self.after
        spare = self.end - now - after
        trains = self.at > now
        evals = EVALS_AFTER if trains else EVALS_AFTER - 1
        fits = int(spare * (EVAL_SHARE if trains else 1 - EVAL_SHARE) / (evals * per_feature))
        if fits < len(feats):
            order = random.Random(trainer.cfg.seed).sample(range(len(examples)), len(examples))
            room = itertools.accumulate(counts[i] for i in order)
            keep = sorted(i for i, used in zip(order, room) if used <= fits) or [order[0]]
            self.dev_rows = (len(keep), len(examples))
            feats[:] = [f for i in keep for f in feats[starts[i] : starts[i + 1]]]
            examples[:] = [examples[i] for i in keep]
        self.at = min(self.at, self.end - after - evals * per_feature * len(feats))

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
    trains = True
    """False for a route that only scores the pretrained model (its Deadline is already past)."""

    def __init__(self, name: str):
        self.name = name
        """The name it is registered under (what `Plan.models` and the leaderboard use)."""

    def unfit(self, plan: Plan) -> str | None:
        """Why the route does not fit the data (None when it does)."""
        raise NotImplementedError

    def run(self, plan: Plan, run_dir: Path, deadline: Deadline) -> None:
        """One run into `run_dir`, `deadline` among its loop's hooks: finished once its
        metrics.json is written (the last file a run writes)."""
        raise NotImplementedError

    def favoured(self, plan: Plan) -> bool:
        """Whether the route wins a tie on the dev metric (see `best`): what is known of it
        for this kind of data, before anything else."""
        return False

    def model_kinds(self, plan: Plan) -> tuple[str, ...]:
        """The kinds of model it can train (a `--model` for it is checked against them): those
        of the task it trains, the data's own by default."""
        return plan.task.model_kinds


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

    def model_kinds(self, plan: Plan) -> tuple[str, ...]:
        kinds: tuple[str, ...] = TASKS.get(self.task(plan)["type"]).impl.model_kinds
        return kinds

    def run(self, plan: Plan, run_dir: Path, deadline: Deadline) -> None:
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
        train(config, hooks=[deadline])


class PromptRoute(TrainedRoute):
    """Routes through an LM's own head (task prompt_classification): they need a template and a
    verbalizer word per label, and single-label text classification."""

    model = "smollm2-135m-instruct"

    def unfit(self, plan: Plan) -> str | None:
        if not plan.single_label_text:
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
    trains = False

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {"max_steps": 1, "batch_size": 8, "eval_batch_size": 32}

    def data_section(self, plan: Plan) -> dict[str, Any]:
        # nothing trains: a few rows instead of templating and tokenizing all of train
        return {"max_train_samples": 8}


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
        why = super().unfit(plan)
        if why is not None:
            return why
        if plan.few:
            return (
                f"few examples per label ({plan.profile.min_per_label} < {plan.few_limit}): "
                "full fine-tuning overfits them"
            )
        return None

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


@ROUTES.register("lm_lora")
class LmLora(TrainedRoute):
    """LoRA on SmolLM2-135M-Instruct trained on the task as read, through the LM's own head:
    the route of tasks that take no encoder (preference pairs: DPO against the model before
    training, the preference task's default loss). r 16 on every linear layer; no dropout, so
    that the policy and its reference (the same model, adapters disabled) score alike; rate
    5e-5, between TRL's LoRA DPO example (5e-6 over an epoch of UltraFeedback) and the SFT
    recipes' 5e-4, so that the few hundred steps a CPU budget allows move the policy (not yet
    measured on real pairs); the best dev checkpoint is kept if it overshoots. No sample
    replies in its report: every dev scoring, and the Deadline's timing of one, would generate
    them."""

    model = "smollm2-135m-instruct"
    method = "lora"
    min_seconds = 60.0

    def unfit(self, plan: Plan) -> str | None:
        kinds = plan.task.model_kinds
        if "encoder" in kinds:
            return "the task takes an encoder with a new head: the head routes adapt it"
        if "causal" not in kinds:
            return f"the task takes no causal LM ({' or '.join(kinds)} only)"
        return None

    def task(self, plan: Plan) -> dict[str, Any]:
        return {**to_dict(plan.task_section), "report_samples": 0}

    def method_section(self, plan: Plan) -> dict[str, Any]:
        return {"name": "lora", "r": 16, "alpha": 32, "target_modules": ["all-linear"]}

    def train_section(self, plan: Plan) -> dict[str, Any]:
        return {
            "epochs": plan.epochs(3),
            "batch_size": 8,
            "eval_batch_size": 8,
            "lr": 5e-5,
            "warmup_ratio": 0.1,
            "dropout": 0.0,
        }


@ROUTES.register("distill")
class Distill(Route):
    """Only with prefer='speed': the best head classifier found so far taught to the first half
    of MiniLM's blocks (3 of 6), trained in full with `run_distill`."""

    model = "minilm"
    method = "full"

    def unfit(self, plan: Plan) -> str | None:
        if plan.prefer != "speed":
            return "only with --prefer speed"
        if not plan.single_label_text:
            what = plan.task.description
            return f"distillation takes single-label classification; this is {what}"
        return None

    def run(self, plan: Plan, run_dir: Path, deadline: Deadline) -> None:
        from transformers import AutoConfig

        from lmadapt.distill import run_distill
        from lmadapt.distill.runner import build_distill_config

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
        run_distill(config, hooks=[deadline])


class Skip(Exception):
    """A route found, once its turn came, that it cannot run (the reason is its message)."""


OK = ("done", "stopped at its time share")
"""Statuses of a route that finished: its run is ranked on the leaderboard."""


def fitting_routes(plan: Plan) -> list[str]:
    """The routes that fit the data, in running order."""
    return [e.name for e in ROUTES if e.impl(e.name).unfit(plan) is None]


def check_route_models(plan: Plan) -> None:
    """Refuse, before any route runs, a model given to a route that fits the data (`--model
    ROUTE=MODEL`) whose kind the task that route trains cannot use: an encoder for preference
    pairs, say. A hub id is left to its route (resolving it may download)."""
    for name in fitting_routes(plan):
        model = plan.models.get(name)
        if model is None or is_hub_id(model):
            continue
        kinds = ROUTES.get(name).impl(name).model_kinds(plan)
        kind = resolve_model(model).kind
        if kind not in kinds:
            a = "an" if kind[0] in "aeiou" else "a"
            raise ConfigError(
                "--model",
                f"{name}={model}: {model} is {a} {kind} model; the {name} route trains "
                f"{plan.task.description} on a {' or '.join(kinds)} model",
            )


def best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best dev metric. Ties are common on a small dev set (accuracy moves in steps of
    1/n): a route `favoured` for the data breaks them, then the lower dev loss, then the
    earlier (cheaper) route."""
    sign = 1 if mode == "max" else -1

    def key(r: dict[str, Any]) -> tuple[float, bool, float]:
        loss = math.inf if r["dev_loss"] is None else r["dev_loss"]
        return sign * r["dev_metric"], r.get("favoured", False), -loss

    return max(rows, key=key)  # max keeps the first of equals
