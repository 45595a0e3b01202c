"""Hyperparameter search around a run config with Optuna: TPE sampling, median pruning, SQLite.

Each trial is one ordinary training run (`lmadapt.api.train`) in <study_dir>/trials/<number>/.
The study lives in <study_dir>/study.db, so re-running the same command resumes it, and the
same command started in another shell is a second worker on the same study.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lmadapt import api
from lmadapt.config import RunConfig, load_config
from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.evaluate import plots
from lmadapt.io import write_text
from lmadapt.rundir import MARKER, RunDir, mark
from lmadapt.schema import config_source, from_dict, read_yaml
from lmadapt.tasks import build_task
from lmadapt.train.loop import Hook, Trainer, TrainingInterrupted, checkpoint_metric

Direction = Literal["maximize", "minimize"]
"""An Optuna study's direction, as `optuna.create_study` takes it."""

STUDY_NAME = "lmadapt"
RESERVED = ("output_dir", "overwrite")
"""Config keys hpo sets for every trial, so a space cannot search them."""
SHADOWED_BY = {"method.lr": "train.lr", "train.epochs": "train.max_steps"}
"""Searching the key is pointless while the config sets the other one."""
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
"""Trials that use up the --trials budget. Failed ones do not (a re-run makes up for them);
running ones (another worker's) do, so that workers together stop at the budget."""


@dataclass
class Param:
    """The distribution of one searched config field: a list of choices or an int/float range."""

    type: Literal["categorical", "int", "float"]
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        if self.type == "categorical":
            self._check_categorical()
            return
        if self.choices is not None:
            raise ConfigError("choices", "only for type categorical")
        if self.low is None:
            raise ConfigError("low", f"is required for type {self.type}")
        if self.high is None:
            raise ConfigError("high", f"is required for type {self.type}")
        if self.type == "int":
            for name in ("low", "high", "step"):
                v = getattr(self, name)
                if v is not None and not float(v).is_integer():
                    raise ConfigError(name, f"must be an integer for type int, got {v}")
        if self.high < self.low:
            raise ConfigError("high", f"must be >= low ({self.low}), got {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError("low", f"must be > 0 with log: true, got {self.low}")
        if self.step is not None and self.step <= 0:
            raise ConfigError("step", f"must be > 0, got {self.step}")
        if self.step is not None and self.log:
            raise ConfigError("step", "cannot be combined with log: true")

    def _check_categorical(self) -> None:
        if not self.choices:
            raise ConfigError("choices", "a non-empty list is required for type categorical")
        for c in self.choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError("choices", f"must be numbers, strings or booleans, got {c!r}")
        for name in ("low", "high", "step"):
            if getattr(self, name) is not None:
                raise ConfigError(name, "only for types int and float")
        if self.log:
            raise ConfigError("log", "only for types int and float")

    def _choices(self) -> list[Any]:
        """A categorical's choices, which `__post_init__` requires."""
        assert self.choices is not None
        return self.choices

    def _range(self) -> tuple[float, float]:
        """An int or float range's bounds, which `__post_init__` requires."""
        assert self.low is not None and self.high is not None
        return self.low, self.high

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(key, self._choices())
        low, high = self._range()
        if self.type == "int":
            step = int(self.step or 1)
            return trial.suggest_int(key, int(low), int(high), step=step, log=self.log)
        return trial.suggest_float(key, low, high, step=self.step, log=self.log)

    def edges(self) -> list[Any]:
        """Values checked against the config up front: every choice, or both bounds."""
        if self.type == "categorical":
            return list(self._choices())
        low, high = self._range()
        if self.type == "int":
            return [int(low), int(high)]
        return [low, high]


def load_space(path: str | Path) -> dict[str, Param]:
    """Read a search-space YAML file: dotted config key -> distribution."""
    raw = read_yaml(path)
    with config_source(path):
        if not isinstance(raw, dict) or not raw:
            raise ConfigError("<root>", "expected a mapping of dotted config keys to distributions")
        space = {}
        for key, spec in raw.items():
            key = str(key)
            if key.split(".")[0] in RESERVED:
                raise ConfigError(key, "is set by hpo for each trial and cannot be searched")
            space[key] = from_dict(Param, spec, key)
    return space


def check_space(
    space: dict[str, Param],
    config: str | Path,
    overrides: list[str],
    space_path: str | Path,
) -> RunConfig:
    """The base config, after checking that every choice and bound makes a valid config, so a
    typo in a key fails now rather than in trial 5."""
    base = load_config(config, overrides)
    for key, param in space.items():
        for value in param.edges():
            try:
                load_config(config, [*overrides, _override(key, value)])
            except ConfigError as e:
                raise ConfigError(
                    key,
                    f"{value!r} is rejected by {config}: field '{e.field}': {e.message}",
                    source=str(space_path),
                ) from None
    for key, other in SHADOWED_BY.items():
        if key in space and other not in space and _lookup(base.to_dict(), other) is not None:
            raise ConfigError(
                key,
                f"has no effect: {config} sets {other}, which takes precedence",
                source=str(space_path),
            )
    if not base.data.dev:
        raise ConfigError(
            "data.dev", "hpo needs a dev set (the objective is a dev metric)", source=str(config)
        )
    return base


def objective_metric(config: RunConfig) -> tuple[str, Direction]:
    """The dev metric that selects the best checkpoint, and the study direction, as the
    Trainer decides them: a trial is worth what its best checkpoint is worth."""
    task = build_task(config.task)
    metric, mode = checkpoint_metric(config.train, task)
    return metric, "maximize" if mode == "max" else "minimize"


class PruningHook(Hook):
    """Reports each dev evaluation to the trial; stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.pruned_at: int | None = None

    def on_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        step = trainer.state.step
        self.trial.report(metrics[trainer.metric], step)
        if self.trial.should_prune():
            self.pruned_at = step
            trainer.state.should_stop = True


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings stay strings, numbers numbers


def hpo(
    config: str | Path,
    space: str | Path,
    trials: int,
    study_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    pruner: optuna.pruners.BasePruner | None = None,
) -> dict[str, Any]:
    """Search `space` around `config` until the study holds `trials` finished (complete or
    pruned) trials, then write best.yaml and report.md to the study directory; returns the
    study's summary.

    The default study directory is the config's output_dir + "_hpo". `pruner` replaces the
    default median pruner.
    """
    overrides = list(overrides or [])
    if trials < 1:
        raise ConfigError("--trials", f"must be >= 1, got {trials}")
    params = load_space(space)
    base = check_space(params, config, overrides, space)
    metric, direction = objective_metric(base)
    out = Path(study_dir or f"{base.output_dir}_hpo")
    if (
        out.exists()
        and not (out / "study.db").exists()
        and any(p.name != MARKER for p in out.iterdir())
    ):
        raise LmadaptError(f"{out} exists and holds no study.db; pick another --study-dir")
    if not (out / "study.db").exists():  # a new study: claimed as lmadapt's, like every run
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "hpo")
    base_dict = {k: v for k, v in base.to_dict().items() if k not in RESERVED}
    fingerprint = {
        "config": base_dict,
        "search space": {k: asdict(p) for k, p in params.items()},
        "objective": f"{direction} dev {metric}",
    }
    study = _open_study(out, json.loads(json.dumps(fingerprint)), direction, base, trials, pruner)
    if len(study.get_trials(deepcopy=False, states=BUDGET_STATES)) < trials:
        objective = _objective(config, overrides, params, out, metric)
        callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
            optuna.study.MaxTrialsCallback(trials, states=BUDGET_STATES),
            _progress(metric, trials),
        ]
        try:
            study.optimize(objective, callbacks=callbacks)
        except TrainingInterrupted:
            raise TrainingInterrupted(
                f"interrupted; re-run the same command to resume the study in {out} "
                "(the interrupted trial starts over)"
            ) from None
        except LmadaptError as e:  # a trial failed: the finished ones stay in the study
            raise LmadaptError(
                f"{e}; the study is kept in {out}: re-run the same command to resume it"
            ) from None
    return write_results(study, out, base_dict, config, overrides, space, metric)


def _open_study(
    out: Path,
    fingerprint: dict[str, Any],
    direction: Direction,
    base: RunConfig,
    trials: int,
    pruner: optuna.pruners.BasePruner | None,
) -> optuna.Study:
    db = out / "study.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db.resolve()}",
            engine_kwargs={"connect_args": {"timeout": 60}},  # workers wait for each other
            heartbeat_interval=60,  # a killed worker's RUNNING trial is failed after 2 minutes
        )
    try:
        n_before = len(storage.get_all_trials(storage.get_study_id_from_name(STUDY_NAME)))
    except KeyError:
        n_before = 0
    # One worker on a fresh study is reproducible; a resumed study or a further worker gets
    # another seed, so that it does not repeat the trials already sampled.
    sampler = optuna.samplers.TPESampler(
        seed=base.train.seed + n_before,
        n_startup_trials=max(2, min(10, trials // 3)),  # random exploration: a third of the budget
    )
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction=direction,
        sampler=sampler,
        pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=3),
        load_if_exists=True,
    )
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif saved != fingerprint:
        changed = " and ".join(k for k in fingerprint if saved.get(k) != fingerprint[k])
        raise LmadaptError(
            f"{db}: this study was started with another {changed}; "
            f"use another --study-dir, or delete {out} to start over"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RUNNING trials of a killed worker
    return study


def _objective(
    config: str | Path, overrides: list[str], space: dict[str, Param], out: Path, metric: str
) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        values = {key: p.suggest(trial, key) for key, p in space.items()}
        run_dir = out / "trials" / str(trial.number)
        cfg = load_config(
            config,
            [
                *overrides,
                *(_override(k, v) for k, v in values.items()),
                _override("output_dir", str(run_dir)),
                "overwrite=true",  # a trial number is never reused: the directory is stale
            ],
        )
        hook = PruningHook(trial)
        metrics = api.train(cfg, hooks=[hook])
        if hook.pruned_at is not None:
            raise optuna.TrialPruned(f"stopped at step {hook.pruned_at}")
        return metrics["dev"][metric]

    return objective


def _progress(metric: str, trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=BUDGET_STATES[:2]))
        if trial.state == TrialState.COMPLETE:
            outcome = f"dev {metric} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at step {trial.last_step}"
        else:
            outcome = trial.state.name.lower()
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        print(
            f"[hpo {done}/{trials}] trial {trial.number}: {outcome} ({params})",
            file=sys.stderr,
            flush=True,
        )

    return report


# ---------------------------------------------------------------------- results


def write_results(
    study: optuna.Study,
    out: Path,
    base: dict[str, Any],
    config: str | Path,
    overrides: list[str],
    space: str | Path,
    metric: str,
) -> dict[str, Any]:
    """best.yaml (when a trial completed) and report.md over every trial in the study."""
    all_trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in all_trials if t.state == s] for s in TrialState}
    complete = by_state[TrialState.COMPLETE]
    best = study.best_trial if complete else None
    if best is not None:
        _write_best_yaml(out, best, config, overrides, metric)
    images = _plots(all_trials, complete, study.direction, metric, out)
    summary = {
        "study_dir": str(out),
        "metric": metric,
        "direction": study.direction.name.lower(),
        **{s.name.lower(): len(by_state[s]) for s in TrialState},
        "best": None
        if best is None
        else {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_dir": str(out / "trials" / str(best.number)),
        },
    }
    write_text(
        RunDir(out).report,
        _markdown(study, summary, by_state, base, config, overrides, space, images),
    )
    if best is None:
        raise LmadaptError(
            f"no trial completed ({summary['pruned']} pruned, {summary['fail']} failed); "
            f"see {out / 'report.md'}"
        )
    return summary


def _write_best_yaml(
    out: Path, best: FrozenTrial, config: str | Path, overrides: list[str], metric: str
) -> None:
    """The base config with the best parameters, validated by loading it, ready to train."""
    chosen = [_override(k, v) for k, v in best.params.items()]
    cfg = load_config(config, [*overrides, *chosen, _override("output_dir", str(out / "best"))])
    header = [
        f"# Best trial of `lmadapt hpo`: trial {best.number}, dev {metric} {best.value:.4f}",
        f"# {config} + {' '.join([*overrides, *chosen])}",
        f"# Train it: lmadapt train {out / 'best.yaml'}",
    ]
    write_text(
        out / "best.yaml", "\n".join(header) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )


def _value(trial: FrozenTrial) -> float:
    """A complete trial's value (optuna types it optional: a failed or pruned one has none)."""
    assert trial.value is not None
    return trial.value


def _plots(
    trials: list[FrozenTrial],
    complete: list[FrozenTrial],
    direction: optuna.study.StudyDirection,
    metric: str,
    out: Path,
) -> list[Path]:
    images = []
    if complete:
        better = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
        numbers: list[float] = [t.number for t in complete]
        values = [_value(t) for t in complete]
        running = [better(values[: i + 1]) for i in range(len(values))]
        plots.curves(
            {f"dev {metric}": (numbers, values), "best so far": (numbers, running)},
            out / "trials.png",
            f"dev {metric} of complete trials",
            xlabel="trial",
        )
        images.append(out / "trials.png")
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            name = f"trial {t.number}" + (" (pruned)" if t.state == TrialState.PRUNED else "")
            curves[name] = (list[float](steps), [t.intermediate_values[s] for s in steps])
    if curves:
        plots.curves(curves, out / "evaluations.png", f"dev {metric} at each evaluation")
        images.append(out / "evaluations.png")
    return images


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _markdown(
    study: optuna.Study,
    summary: dict[str, Any],
    by_state: dict[TrialState, list[FrozenTrial]],
    base: dict[str, Any],
    config: str | Path,
    overrides: list[str],
    space: str | Path,
    images: list[Path],
) -> str:
    metric, best = summary["metric"], summary["best"]
    keys = list(study.user_attrs["fingerprint"]["search space"])
    finished = sum(len(by_state[s]) for s in BUDGET_STATES[:2])
    lines = [
        f"# Hyperparameter search `{Path(summary['study_dir']).name}`",
        "",
        f"- **base config**: `{config}`" + (f" + `{' '.join(overrides)}`" if overrides else ""),
        f"- **search space**: `{space}` ({', '.join(keys)})",
        f"- **objective**: dev {metric} of each trial's best checkpoint ({summary['direction']})",
        f"- **trials**: {finished} finished: {summary['complete']} complete, "
        f"{summary['pruned']} pruned; {summary['fail']} failed, {summary['running']} running",
        f"- **study**: `study.db` ({type(study.sampler).__name__}, "
        f"{type(study.pruner).__name__}); re-run the command to resume it or to add a worker",
    ]
    if best is not None:
        lines.append(
            f"- **best**: trial {best['number']}, dev {metric} {best['value']:.4f}, "
            f"run `trials/{best['number']}/`; `best.yaml` trains it again into `best/`"
        )
        lines += [
            "",
            "## Best vs base config",
            "",
            f"| parameter | base config | best (trial {best['number']}) |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {_fmt(_lookup(base, k))} | {_fmt(best['params'][k])} |" for k in keys]
    lines += [
        "",
        "## Trials",
        "",
        f"| trial | state | dev {metric} | " + " | ".join(keys) + " |",
        "|---:|---|---:|" + "---:|" * len(keys),
    ]
    for t in sorted((t for ts in by_state.values() for t in ts), key=lambda t: t.number):
        if t.state == TrialState.PRUNED and t.last_step is not None:
            value = f"{t.intermediate_values[t.last_step]:.4f} at step {t.last_step}"
        else:
            value = "-" if t.value is None else f"{t.value:.4f}"
        params = " | ".join(_fmt(t.params[k]) if k in t.params else "-" for k in keys)
        lines.append(f"| {t.number} | {t.state.name.lower()} | {value} | {params} |")
    lines += ["", "## Parameter importances", "", _importances(study, by_state)]
    if images:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def _importances(study: optuna.Study, by_state: dict[TrialState, list[FrozenTrial]]) -> str:
    n = len(by_state[TrialState.COMPLETE])
    if n < 2:
        return "Needs at least 2 complete trials."
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as e:
        return f"Not computed: {e}"
    return "\n".join(
        [
            f"Share of the dev metric's variation explained by each parameter over {n} complete "
            "trials (fANOVA, optuna.importance); a rough guide with few trials.",
            "",
            "| parameter | importance |",
            "|---|---:|",
            *(f"| {k} | {v:.3f} |" for k, v in importances.items()),
        ]
    )
