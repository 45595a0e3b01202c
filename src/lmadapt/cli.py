"""`lmadapt` command line: each subcommand parses arguments and calls one API function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Callable

from lmadapt.errors import LmadaptError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str) -> Callable:
    def deco(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn

    return deco


@command("train", "fine-tune a model from a YAML config (key=value overrides after it)")
def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import train

        out = Path(train(a.config, a.overrides)["run_dir"])
        print((out / "report.md").read_text(encoding="utf-8"))
        print(f"run directory: {out}")

    p.set_defaults(run=run)


@command("eval", "evaluate a finished run on a labelled data file")
def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--format", default="auto")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import evaluate

        ev, markdown = evaluate(a.run_dir, a.data, a.format)
        print(json.dumps(ev.metrics, indent=2) if a.json else markdown)

    p.set_defaults(run=run)


@command("predict", "predict labels for texts or a file with a finished run")
def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="csv/tsv/jsonl file with the run's text column")
    p.add_argument("--format", default="auto")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import predict

        if not a.texts and not a.file:
            raise LmadaptError("predict needs TEXT arguments or --file")
        for row in predict(a.run_dir, a.texts, a.file, a.format):
            print(json.dumps(row, ensure_ascii=False))

    p.set_defaults(run=run)


@command("methods", "list adaptation methods with trainable-parameter counts")
def _methods(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="model to count parameters on")
    p.add_argument("--no-count", action="store_true", help="skip loading the model")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.methods import METHODS

        counts = {} if a.no_count else _method_counts(a.model)
        print(f"{'method':<16}{'trainable':>14}{'share':>9}  about")
        for entry in METHODS:
            n, total = counts.get(entry.name, (None, None))
            share = f"{100 * n / total:.2f}%" if n is not None else "-"
            print(f"{entry.name:<16}{(f'{n:,}' if n is not None else '-'):>14}{share:>9}  {entry.summary}")

    p.set_defaults(run=run)


def _method_counts(model: str) -> dict[str, tuple[int, int]]:
    """Trainable/total parameters of each method on `model` with a 2-label classification head."""
    from lmadapt.config import parse_section
    from lmadapt.methods import METHODS, build_method, count_parameters
    from lmadapt.models import resolve_model
    from lmadapt.tasks import TASKS, build_task

    spec = resolve_model(model)
    task = build_task(parse_section(TASKS, "type", "classification", "task"), {"labels": ["0", "1"]})
    out = {}
    for entry in METHODS:
        method = build_method(parse_section(METHODS, "name", entry.name, "method"))
        m = method.apply(task.build_model(spec), task)
        out[entry.name] = count_parameters(m)
    return out


@command("models", "list the embedded default models and the tasks they suit")
def _models(p: argparse.ArgumentParser) -> None:
    def run(a: argparse.Namespace) -> None:
        from lmadapt.models import list_models

        for row in list_models():
            status = "ok" if row["available"] else "missing"
            tasks = ", ".join(row.get("tasks", []))
            print(f"{row['name']:<24}{status:<9}{row.get('kind', ''):<9}{tasks:<50}{row['about']}")

    p.set_defaults(run=run)


def quiet_libraries() -> None:
    """Keep library chatter (load reports, upstream deprecations) out of the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        args.run(args)
    except LmadaptError as e:
        print(f"lmadapt: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmadapt: interrupted", file=sys.stderr)
        return 130
    return 0



if __name__ == "__main__":
    sys.exit(main())
