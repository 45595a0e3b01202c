"""The one training loop. Read it top to bottom in `Trainer.fit`.

Everything task- or strategy-specific plugs in from outside: the task gives the loss and the
metrics; hooks add loss terms (continual-learning penalties, distillation) or react to events
(replay, logging). Early stopping and best-checkpoint keeping are part of the loop's state.

Under several processes (`train/distributed.py`) every process walks the same global batches and
trains on its slice of each; process 0 alone evaluates (or all do, when the weights are sharded),
logs and writes checkpoints, and broadcasts what decides early stopping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from lmadapt.data.batching import (
    Batches,
    feature_lengths,
    length_grouped_batches,
    shuffled_batches,
)
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.evaluate.metrics import metric_direction
from lmadapt.hooks import Hook
from lmadapt.inference import (
    Encoded,
    autocast,
    autocast_bf16,
    frozen_base_dtype,
    model_inputs,
)
from lmadapt.io import write_text
from lmadapt.rundir import RunDir
from lmadapt.train.bf16_base import frozen_in_bf16
from lmadapt.train.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    save_trainable,
)
from lmadapt.train.config import TrainConfig
from lmadapt.train.distributed import SINGLE, STRATEGIES, Distributed
from lmadapt.train.int8_base import frozen_in_int8

if TYPE_CHECKING:  # the protocol only: tasks sit above the loop
    from lmadapt.tasks.base import Task


@runtime_checkable
class BatchPreparingTask(Protocol):
    """A task whose loss needs what only the model can add to a batch, asked before each
    training forward (e.g. preference's reference log-probabilities)."""

    def prepare_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Add to `batch` (on the device) what the task's loss reads; no gradients flow."""


class TrainingInterrupted(LmadaptError):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed."""

    exit_code = 130


@dataclass
class TrainState:
    """Everything the loop knows; saved in each checkpoint so a resumed run continues exactly."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Passes over the training set begun (0-based: the one in progress)."""
    next_batch: int = 0
    """Index of the next batch of `epoch` to train on (data-loader position)."""
    samples: int = 0
    """Training examples seen, all processes together."""
    tokens: int = 0
    """Non-padding tokens seen (all processes together, like `samples`)."""
    train_seconds: float = 0.0
    """Time in training steps, evaluations excluded (samples/s is measured on it)."""
    running_loss: float = 0.0
    """Sum of the losses since the last log line; their mean is what is logged."""
    running_n: int = 0
    best_metric: float | None = None
    """The best dev value of the checkpoint metric so far; None before the first evaluation."""
    best_step: int | None = None
    bad_evals: int = 0
    """Evaluations in a row without improvement (early stopping counts them)."""
    should_stop: bool = False
    """Set by early stopping or a hook; the loop ends after the current step."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every logged and evaluated row, in order: the lines of the run's log.jsonl."""


@dataclass
class TrainResult:
    state: TrainState
    best_metrics: dict[str, float] | None
    stopped_early: bool

    @property
    def samples_per_second(self) -> float:
        return self.state.samples / max(self.state.train_seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.state.tokens / max(self.state.train_seconds, 1e-9)


def checkpoint_metric(cfg: TrainConfig, task: Task) -> tuple[str, str]:
    """The dev metric that picks the best checkpoint, and its direction ('max' or 'min').

    Checked against what the task reports, so a misspelt name fails before anything is written;
    with `metric_mode: auto` the direction comes from the metric (a loss is minimised)."""
    metric = cfg.metric or task.default_metric
    if metric not in task.metric_names:
        raise ConfigError(
            "train.metric",
            f"{metric!r} is not a dev metric of task '{task.kind}'; "
            f"one of: {', '.join(task.metric_names)}",
        )
    mode = metric_direction(metric) if cfg.metric_mode == "auto" else cfg.metric_mode
    return metric, mode


class DeferredInterrupt:
    """Ctrl-C during training: the first finishes the current optimizer step and checkpoints
    there, so that a resume is exact; a second aborts at once (the last checkpoint stays).

    Only the main thread can own SIGINT; elsewhere (e.g. a server's worker) nothing changes."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nlmadapt: stopping after this step to save a checkpoint (Ctrl-C again aborts)",
            file=sys.stderr,
        )

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def chosen_dropout(cfg: TrainConfig, task: Task) -> float | str | None:
    """The dropout the run says (`train.dropout`, else the task's choice): a probability for
    every dropout, "model" to keep the model's, or None to leave it to the method."""
    return cfg.dropout if cfg.dropout is not None else task.train_dropout


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout probability in the model (its adapters' too) set to `p`."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    impl: str = "fused",
    heads: tuple[list[str], float] | None = None,
    rules: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; no decay on biases and norms (1-D tensors).

    `heads` = (module names, rate): parameters under a module of one of those names train at
    that rate. `rules` = {name part: multiplier} (a method's `lr_rules`, e.g. LoRA+'s B at
    lr x 16): a parameter with that part in its dotted name trains at lr x multiplier. The head
    rule wins over `rules` (the head's rate is set for it alone), and among rules the first
    that matches. `impl` picks torch's fused kernel (one pass over each parameter's weights,
    gradients and moments) or its foreach kernel (several multi-tensor passes); the numbers are
    the same."""
    names, head_lr = heads or ([], lr)
    # (no decay, 0 run's rate / 1 head / 2 a rule, that rate): without rules or a head rate the
    # groups, their order and keys are those of one rate, so older checkpoints still resume
    buckets: dict[tuple[bool, int, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = set(name.split("."))
        rate = next((lr * m for part, m in (rules or {}).items() if part in parts), lr)
        kind = 0 if rate == lr else 2
        if head_lr != lr and not parts.isdisjoint(names):
            kind, rate = 1, head_lr
        buckets.setdefault((p.ndim < 2, kind, rate), []).append(p)
    groups = [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            **({"lr": rate} if kind else {}),
        }
        for (no_decay, kind, rate), params in sorted(buckets.items())
    ]
    fused = impl == "fused"
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None, foreach=not fused or None)


def linear_factor(warmup: int, total: int) -> Any:
    """The learning-rate multiplier at each step: linear warm-up, then linear decay to 0 at
    `total` (a hook that shortens the run swaps it in, e.g. `lmadapt auto`'s deadline)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, linear_factor(warmup, total))


FROZEN_BASE: dict[str, Callable[[torch.nn.Module], Callable[[], None]]] = {
    "bf16": frozen_in_bf16,
    "int8": frozen_in_int8,
}
"""How each `frozen_base_dtype` other than fp32 sets the frozen weights up for training; each
returns the function that puts the fp32 ones back."""


@dataclass
class _FitRun:
    """What one `fit` call sets up and its parts share."""

    plain: torch.nn.Module
    """The model as given (the strategy's wrapper is in `Trainer.model` until the end)."""
    net: Any
    """What the training step calls."""
    total: int
    """Optimizer steps the run takes."""
    trainable: list[torch.nn.Parameter]
    forward_kwargs: Callable[..., dict[str, Any]]
    bar: Any
    interrupt: DeferredInterrupt
    restore_base: Callable[[], None] | None
    """Puts the fp32 frozen weights back, where they trained in bf16 or int8."""


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        task: Task,
        train_features: list[dict[str, Any]],
        collator: Any,
        cfg: TrainConfig,
        lr: float,
        run_dir: Path,
        dev_features: list[dict[str, Any]] | None = None,
        dev_examples: list[Any] | None = None,
        hooks: list[Hook] | None = None,
        dist: Distributed = SINGLE,
        resumable: bool = True,
        lr_rules: dict[str, float] | None = None,
    ):
        """`resumable`: whether `lmadapt train --resume` can continue this run (not so for the
        steps of distill or continual, which a Ctrl-C simply stops). `lr_rules`: the method's
        per-parameter rate multipliers (`build_optimizer`'s `rules`)."""
        self.model, self.task, self.cfg, self.lr = model, task, cfg, lr
        self.lr_rules = lr_rules or {}
        self.resumable = resumable
        self.dist, self.strategy = dist, STRATEGIES[dist.strategy]
        # process 0 evaluates and saves; sharded weights need every process to take part
        self.takes_part = dist.is_main or self.strategy.sharded
        self.train_features, self.collator = train_features, collator
        self.dev_features, self.dev_examples = dev_features, dev_examples
        self.run_dir = Path(run_dir)
        self.hooks = hooks or []
        self.state = TrainState()
        self.bf16 = autocast_bf16(cfg.precision, dist.device)
        self.base_dtype = frozen_base_dtype(cfg.base_dtype, self.bf16, dist.device, dist.strategy)
        self.metric, self.mode = checkpoint_metric(cfg, task)
        # asked once here, not on every batch (an isinstance on a Protocol reads its members)
        self.prepare_batch = task.prepare_batch if isinstance(task, BatchPreparingTask) else None
        self.best_path = RunDir(self.run_dir).checkpoints / "best.safetensors"
        self.lengths = feature_lengths(train_features)  # a feature store's, read from disk
        self._loss_sum = torch.zeros((), dtype=torch.float64)  # set on the device by `fit`
        # the method's default (none in a frozen base) was set as the model was built
        dropout = chosen_dropout(cfg, task)
        if dropout is not None and dropout != "model":
            set_dropout(model, float(dropout))

    # ------------------------------------------------------------------ schedule
    def batches_for_epoch(self, epoch: int) -> Batches:
        seed = self.cfg.seed + epoch
        grouped = self.cfg.group_by_length
        if grouped is None:  # the task's choice
            grouped = self.task.groups_by_length
        if grouped:
            return length_grouped_batches(self.lengths, self.cfg.batch_size, seed)
        return shuffled_batches(len(self.lengths), self.cfg.batch_size, seed)

    def head_lr(self) -> float:
        """The head's rate: `train.head_lr`, else the run's, raised to the task's floor."""
        if self.cfg.head_lr is not None:
            return self.cfg.head_lr
        return max(self.lr, self.task.head_lr_floor or 0.0)

    def total_steps(self) -> int:
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per_epoch = math.ceil(
            math.ceil(len(self.lengths) / self.cfg.batch_size) / self.cfg.grad_accum
        )
        return max(1, math.ceil(self.cfg.epochs * per_epoch))

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        run = self._setup_fit(resume)
        state = self.state
        try:
            run.interrupt.install()
            while state.step < run.total and not state.should_stop:
                batches = self.batches_for_epoch(state.epoch)
                for i in range(state.next_batch, len(batches)):
                    # accumulate gradients over grad_accum batches, exchanging them on the last
                    accumulate = bool((i + 1) % cfg.grad_accum) and i + 1 < len(batches)
                    stops = self._train_batch(run, batches[i], accumulate)
                    if accumulate:
                        continue
                    self._optimizer_step(run, next_batch=i + 1, stops=stops)
                    if state.step >= run.total or state.should_stop:
                        break
                else:
                    self._end_epoch()
            if self._last_eval_step() != state.step:
                self.evaluate()  # the final weights are always evaluated
            if run.interrupt.requested:  # Ctrl-C during that evaluation is honoured, not lost
                self._stop_here()
        except KeyboardInterrupt:  # a second Ctrl-C, mid-step: this step cannot be saved
            raise self._aborted() from None
        finally:
            self._close_fit(run)
        return self._finish_fit(run)

    def _setup_fit(self, resume: bool) -> _FitRun:
        """Optimizer, schedule, resumed state, log and progress bar: all that `fit` needs before
        its first batch. The model is wrapped for the strategy (and on its device) from here
        on, until `_finish_fit` puts the plain one back."""
        cfg, dist = self.cfg, self.dist
        plain = self.model
        # before the model moves to its device, so the fp32 originals stay on the host
        cast = FROZEN_BASE.get(self.base_dtype)
        restore_base = cast(plain) if cast else None
        self.model, net = self.strategy.wrap(plain, dist)  # net: what the training step calls
        model = self.model
        total = self.total_steps()
        heads = (self.task.head_modules(plain), self.head_lr())
        optimizer = build_optimizer(
            model, self.lr, cfg.weight_decay, cfg.optimizer, heads, self.lr_rules
        )
        scheduler = linear_schedule(optimizer, int(cfg.warmup_ratio * total), total)
        self.optimizer, self.scheduler = optimizer, scheduler
        if resume:
            self._restore()
        state = self.state
        # the running loss (float64, as the state keeps it) summed on the device between logs
        self._loss_sum = torch.tensor(state.running_loss, dtype=torch.float64, device=dist.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # a task may ask the model for less (e.g. logits only where its loss reads them)
        forward_kwargs = self.task.forward_kwargs
        self.log_file = (
            open(RunDir(self.run_dir).log, "a", encoding="utf-8")  # noqa: SIM115
            if dist.is_main
            else None
        )
        self.tb = _tensorboard(self.run_dir / "tb") if dist.is_main else None
        for h in self.hooks:
            h.on_train_start(self)
        net.train()
        bar = tqdm(
            total=total,
            initial=state.step,
            desc="train",
            unit="step",
            mininterval=1.0,
            # only process 0 shows it; otherwise tqdm's own settings decide (TQDM_DISABLE=1)
            **({} if dist.is_main else {"disable": True}),
        )
        self._clock = time.perf_counter()
        return _FitRun(
            plain, net, total, trainable, forward_kwargs, bar, DeferredInterrupt(), restore_base
        )

    def _train_batch(self, run: _FitRun, idx: Any, accumulate: bool) -> float:
        """Forward and backward over this process's slice of one batch (gradients add up until
        the optimizer step); returns how many processes have been interrupted (0 when none)."""
        cfg, dist, state, model = self.cfg, self.dist, self.state, self.model
        rows, share = dist.shard(idx)
        batch = self.collator([self.train_features[j] for j in rows])
        tokens = float(batch["attention_mask"].sum()) if share else 0.0  # on the host batch
        batch = {k: v.to(dist.device) for k, v in batch.items()}
        with self.strategy.no_sync(run.net) if accumulate else contextlib.nullcontext():
            with autocast(self.bf16, dist.device.type):
                if self.prepare_batch is not None:
                    self.prepare_batch(run.plain, batch)
                outputs = run.net(**model_inputs(batch), **run.forward_kwargs(model, batch))
            loss = self.task.loss(self.task.logits(outputs), batch)
            for h in self.hooks:
                extra = h.loss_term(model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
            # the engine averages over processes: weigh each by its share of the batch
            (loss * (share * dist.world_size) / cfg.grad_accum).backward()
        if dist.enabled:
            # one exchange: the batch's loss, its tokens, and whether any process was
            # interrupted (so that all of them stop at the same step)
            batch_loss, tokens, stops = dist.sum(
                [float(loss.detach()) * share, tokens, float(run.interrupt.requested)]
            )
            state.running_loss += batch_loss
        else:  # no host sync: the loss stays on the device until it is logged
            self._loss_sum += loss.detach().double() * share
            stops = float(run.interrupt.requested)
        state.running_n += 1
        state.samples += len(idx)
        state.tokens += int(tokens)
        return stops

    def _optimizer_step(self, run: _FitRun, next_batch: int, stops: float) -> None:
        """One optimizer step on the gradients gathered so far, then what follows a step: hooks,
        the loss log, evaluation and checkpoint when due, and the stop a Ctrl-C asked for."""
        cfg, state = self.cfg, self.state
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.next_batch = next_batch
        run.bar.update(1)
        for h in self.hooks:
            h.on_step_end(self)
        if state.step % cfg.log_every == 0 or state.step == run.total:
            self._read_loss()
            mean = state.running_loss / state.running_n
            self.log({"loss": mean, "lr": self.scheduler.get_last_lr()[0]})
            run.bar.set_postfix(loss=f"{mean:.4f}")
            state.running_loss, state.running_n = 0.0, 0
            self._loss_sum.zero_()
        evaluated = bool(cfg.eval_every and state.step % cfg.eval_every == 0)
        if evaluated:
            self.evaluate()
        if (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or (
            evaluated and not cfg.checkpoint_every
        ):
            self.checkpoint()
        if stops:
            self._stop_here()

    def _end_epoch(self) -> None:
        """Past an epoch's last batch; without `eval_every` an epoch's end evaluates (and, without
        `checkpoint_every`, checkpoints)."""
        state, cfg = self.state, self.cfg
        state.epoch, state.next_batch = state.epoch + 1, 0
        if not cfg.eval_every:
            self.evaluate()
            if not cfg.checkpoint_every:
                self.checkpoint()

    def _aborted(self) -> TrainingInterrupted:
        """The error for a second Ctrl-C: the step under way is lost, the last checkpoint named."""
        last = latest_checkpoint(RunDir(self.run_dir).checkpoints) if self.resumable else None
        return TrainingInterrupted(
            f"aborted during step {self.state.step + 1}; "
            + (
                f"resume from checkpoint {last.name} with: lmadapt train --resume {self.run_dir}"
                if last
                else "no checkpoint was saved yet"
            )
        )

    def _close_fit(self, run: _FitRun) -> None:
        """However `fit` ends: the fp32 base and the SIGINT handler back, the time counted, the
        bar, log and TensorBoard writer closed."""
        if run.restore_base:
            run.restore_base()
        run.interrupt.restore()
        self._tick()
        run.bar.close()
        if self.log_file:
            self.log_file.close()
        if self.tb:
            self.tb.close()

    def _finish_fit(self, run: _FitRun) -> TrainResult:
        """The plain model back, holding the best weights (process 0 wrote them), and the result."""
        self.strategy.unwrap(self.model, run.plain)
        self.model = run.plain
        self.dist.barrier()  # process 0 has written best.safetensors
        if self.best_path.exists():
            load_trainable(self.model, self.best_path)
        for h in self.hooks:
            h.on_train_end(self)
        state = self.state
        best = next(
            (r["dev"] for r in state.history if r.get("step") == state.best_step and "dev" in r),
            None,
        )
        return TrainResult(state, best, stopped_early=state.should_stop)

    def _read_loss(self) -> None:
        """The state's running loss from the device's sum (one sync; under several processes
        the state sums it itself, from the per-step exchange)."""
        if not self.dist.enabled:
            self.state.running_loss = float(self._loss_sum)

    def _tick(self) -> None:
        """Add the time since the last tick to train_seconds (eval and checkpoints excluded)."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._clock
        self._clock = now

    def _last_eval_step(self) -> int | None:
        return next((r["step"] for r in reversed(self.state.history) if "dev" in r), None)

    # ------------------------------------------------------------------ checkpoints
    def _stop_here(self) -> None:
        """After a first Ctrl-C: checkpoint this step and stop, resumable exactly."""
        if not self.resumable:
            raise TrainingInterrupted(
                f"interrupted at step {self.state.step}; this command does not resume (only "
                "`lmadapt train` runs do): run it again"
            )
        path = self.checkpoint()
        raise TrainingInterrupted(
            f"interrupted at step {self.state.step}; checkpoint {path} saved. "
            f"Resume with: lmadapt train --resume {self.run_dir}"
        )

    def checkpoint(self) -> Path:
        self._tick()
        self._read_loss()  # the saved state holds the running loss
        root = RunDir(self.run_dir).checkpoints
        if self.takes_part:
            save_checkpoint(
                root,
                self.state.step,
                self.model,
                self.optimizer,
                self.scheduler,
                dataclasses.asdict(self.state),
                self.cfg.keep_checkpoints,
                write=self.dist.is_main,
            )
        self._clock = time.perf_counter()
        return checkpoint_dir(root, self.state.step)

    def _restore(self) -> None:
        path = latest_checkpoint(RunDir(self.run_dir).checkpoints)
        if path is None:
            raise LmadaptError(f"{self.run_dir}: no checkpoint to resume from")
        saved = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.state = TrainState(**saved)
        if self.dist.is_main:  # the log is rewritten to what the checkpoint knew
            write_text(
                RunDir(self.run_dir).log,
                "".join(json.dumps(r) + "\n" for r in self.state.history),
            )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float] | None:
        if not self.dev_features:
            return None
        if self.dev_examples is None:  # the task scores against the examples' references
            raise ValueError("Trainer: dev_features were given without their dev_examples")
        self._tick()
        metrics = None
        if self.takes_part:
            dev = Encoded(
                self.dev_features, self.dev_examples, self.collator, self.cfg.eval_batch_size
            )
            # on the training device (inference.on_model_device); bf16 weights need autocast
            with autocast(self.base_dtype == "bf16", self.dist.device.type):
                ev = self.task.evaluate_model(self.model, dev)
            metrics = dict(ev.metrics)
        metrics = self.dist.broadcast(metrics)  # process 0's numbers decide for every process
        if self.metric not in metrics:  # e.g. text metrics asked of a dev set with no references
            raise LmadaptError(
                f"train.metric '{self.metric}' is not among this dev set's metrics {list(metrics)}"
            )
        self.log({"dev": metrics})
        value = metrics[self.metric]
        state = self.state
        improved = state.best_metric is None or (
            value > state.best_metric + self.cfg.early_stopping.min_delta
            if self.mode == "max"
            else value < state.best_metric - self.cfg.early_stopping.min_delta
        )
        if improved:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            if self.takes_part:
                save_trainable(self.model, self.best_path, write=self.dist.is_main)
        else:
            state.bad_evals += 1
            patience = self.cfg.early_stopping.patience
            if patience is not None and state.bad_evals >= patience:
                state.should_stop = True
        for h in self.hooks:
            h.on_evaluate(self, metrics)
        self._clock = time.perf_counter()
        return metrics

    def log(self, record: dict[str, Any]) -> None:
        record = {"step": self.state.step, "epoch": self.state.epoch, **record}
        self.state.history.append(record)
        if self.log_file is None:  # not process 0
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.tb:
            for key, value in record.items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        self.tb.add_scalar(f"{key}/{k}", v, self.state.step)
                elif key not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{key}", value, self.state.step)


def _tensorboard(path: Path) -> Any:
    if os.environ.get("LMADAPT_TENSORBOARD", "1") == "0":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))
