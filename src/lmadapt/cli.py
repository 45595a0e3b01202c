"""`lmadapt` command line: each subcommand parses arguments and calls one API function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmadapt.errors import ConfigError, LmadaptError
from lmadapt.rundir import RunDir

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}
API: dict[str, str] = {}
"""Command -> the name, in the `lmadapt` package, of the API function it calls: every command
is a thin layer over one typed function (tests/test_cli.py checks each exists and is called)."""


def command(name: str, help: str, api: str) -> Callable:
    def deco(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        API[name] = api
        return fn

    return deco


def _show(report: Path, where: str) -> None:
    """A finished command's report.md, then where its files are."""
    print(report.read_text(encoding="utf-8"))
    print(where)


@command(
    "train", "fine-tune a model from a YAML config (key=value overrides after it)", api="train"
)
def _train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")

    def run(a: argparse.Namespace) -> None:
        if a.resume:
            if a.config or a.overrides:
                raise LmadaptError("--resume takes the run directory only (its config is reused)")
            from lmadapt.api import resume

            metrics = resume(a.resume)
        elif a.config:
            from lmadapt.config import load_config

            config = load_config(a.config, a.overrides)  # a bad config is told before torch loads
            from lmadapt.api import train

            metrics = train(config)
        else:
            raise LmadaptError("train needs a CONFIG.yaml (or --resume RUN_DIR)")
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun only process 0 reports (other nodes may not see its files)
        out = Path(metrics["run_dir"])
        _show(RunDir(out).report, f"run directory: {out}")

    p.set_defaults(run=run)


@command("eval", "evaluate a finished run on a labelled data file", api="evaluate")
def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--format", default="auto")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import evaluate

        ev, markdown = evaluate(a.run_dir, a.data, a.format, a.device)
        print(json.dumps(ev.metrics, indent=2) if a.json else markdown)

    p.set_defaults(run=run)


@command("predict", "predict labels for texts or a file with a finished run", api="predictions")
def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument(
        "texts",
        nargs="*",
        help='input texts; question answering: JSON objects {"question": ..., "context": ...}',
    )
    p.add_argument(
        "--file",
        help="csv/tsv/jsonl file with the run's text column (question answering: SQuAD JSON "
        "or JSONL with question and context)",
    )
    p.add_argument("--format", default="auto")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import predictions

        if not a.texts and not a.file:
            raise LmadaptError("predict needs TEXT arguments or --file")
        for row in predictions(a.run_dir, a.texts, a.file, a.format, a.device):
            print(json.dumps(row, ensure_ascii=False))

    p.set_defaults(run=run)


@command("methods", "list adaptation methods with trainable-parameter counts", api="methods")
def _methods(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="model to count parameters on")
    p.add_argument("--no-count", action="store_true", help="skip loading the model")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import methods

        print(f"{'method':<16}{'trainable':>14}{'share':>9}  about")
        for row in methods(None if a.no_count else a.model):
            n, total = row["trainable"], row["total"]
            share = f"{100 * n / total:.2f}%" if n is not None else "-"
            count = f"{n:,}" if n is not None else "-"
            print(f"{row['name']:<16}{count:>14}{share:>9}  {row['about']}")

    p.set_defaults(run=run)


@command("models", "list the embedded default models and the tasks they suit", api="models")
def _models(p: argparse.ArgumentParser) -> None:
    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import models

        for row in models():
            status = "ok" if row["available"] else "missing"
            tasks = ", ".join(row["tasks"])
            print(f"{row['name']:<24}{status:<9}{row.get('kind', ''):<9}{tasks:<50}{row['about']}")

    p.set_defaults(run=run)


def _allowed_host_arg(p: argparse.ArgumentParser) -> None:
    """`--allowed-host` of serve and ui (ServeSettings.allowed_hosts)."""
    p.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name requests may give besides loopback and --host, e.g. the one a reverse "
        "proxy forwards (repeatable); others get 400, so a web page cannot rebind its own name "
        "to this server",
    )


@command(
    "serve",
    "serve finished runs over HTTP: /v1/classify, /v1/ner, /v1/qa, /v1/generate, "
    "/v1/chat/completions, /v1/explain, /v1/models, /v1/models/{model}, /health",
    api="serve",
)
def _serve(p: argparse.ArgumentParser) -> None:
    from lmadapt.serve.settings import ServeSettings

    d = ServeSettings()
    p.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="runs or ONNX exports (`lmadapt export --format onnx`), served by directory name",
    )
    p.add_argument(
        "--runs-dir",
        metavar="DIR",
        help="instead of RUN_DIRs: serve every finished run under DIR, loading one when first "
        "asked for (runs added later included), least recently used ones unloaded to stay "
        "within --memory-budget-mb",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=float,
        help="with --runs-dir: most MB of weights in memory (default: half the available RAM)",
    )
    p.add_argument(
        "--host",
        default=d.host,
        help="bind address; one other than loopback needs an API key (or --allow-no-auth)",
    )
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint; default: the "
        "LMADAPT_API_KEY environment variable (preferred: a command line is visible to other "
        "local users)",
    )
    p.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="serve a non-loopback --host without an API key (anyone who reaches it may call)",
    )
    _allowed_host_arg(p)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="texts per forward pass")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a request waits for others to batch with",
    )
    p.add_argument("--max-texts", type=int, default=d.max_texts, help="texts per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per text")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="queued requests per model before answering 503",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest request body, refused before parsing; default: 6 bytes (a JSON \\uXXXX "
        "escape) per character of --max-texts x --max-chars, plus 64 KiB",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        # an empty variable counts as unset; an empty --api-key is refused
        key = a.api_key if a.api_key is not None else os.environ.get("LMADAPT_API_KEY") or None
        settings = ServeSettings.from_flags(a, api_key=key)
        if bool(a.run_dirs) == bool(a.runs_dir):
            raise ConfigError("RUN_DIR", "give run directories or --runs-dir DIR (one of the two)")
        from lmadapt.serve import serve

        serve(a.run_dirs, settings, a.log_level, a.runs_dir)

    p.set_defaults(run=run)


@command(
    "compare",
    "train one config with several methods and tabulate accuracy, size, speed",
    api="compare",
)
def _compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: every registered method)",
    )
    _overrides_after_options(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.compare import compare
        from lmadapt.methods import METHODS

        methods = a.methods.split(",") if a.methods else METHODS.names()
        result = compare(a.config, [m.strip() for m in methods if m.strip()], a.overrides)
        out = Path(result["output_dir"])
        print((out / "compare.md").read_text(encoding="utf-8"))
        print(f"comparison written to {out}")

    p.set_defaults(run=run)


@command(
    "hpo", "search hyperparameters with Optuna (TPE, median pruning); re-run to resume", api="hpo"
)
def _hpo(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config: the base every trial starts from")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every trial")
    p.add_argument("--space", required=True, help="YAML search space: dotted key -> distribution")
    p.add_argument("--trials", type=int, required=True, help="trials the study should hold")
    p.add_argument(
        "--study-dir", help="study.db, trials/, best.yaml, report.md (default: output_dir_hpo)"
    )
    _overrides_after_options(p)

    def run(a: argparse.Namespace) -> None:
        import optuna

        from lmadapt.hpo import hpo

        # hpo prints a line per trial, and a failing trial ends the command with its error
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        out = Path(hpo(a.config, a.space, a.trials, a.study_dir, a.overrides)["study_dir"])
        _show(RunDir(out).report, f"study directory: {out}")

    p.set_defaults(run=run)


def _overrides_after_options(p: argparse.ArgumentParser) -> None:
    """Accept `CONFIG --opt X key=value`: argparse binds a '*' positional at its first
    chance (right after CONFIG), so later overrides come back unparsed; collect them."""
    parse = p.parse_known_args

    def parse_known_args(
        args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = parse(args, namespace)
        ns.overrides += [r for r in rest if not r.startswith("-")]
        return ns, [r for r in rest if r.startswith("-")]

    # overridden on this one parser (argparse makes every subparser from one class), by setattr:
    # a plain assignment to a method reads to the type checker as a mistake
    setattr(p, "parse_known_args", parse_known_args)  # noqa: B010


@command(
    "export",
    "write a run as a plain model: transformers (adapter merged in), ONNX or GGUF",
    api="export_run",
)
def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument(
        "--out",
        "--merge",
        dest="out",
        metavar="OUT_DIR",
        required=True,
        help="where to write the export (--merge OUT_DIR: the older spelling, same meaning)",
    )
    # checked against lmadapt.export.FORMATS by export_run: importing the registry here would
    # load the model code whenever any command's parser is built
    p.add_argument(
        "--format",
        default="safetensors",
        metavar="{safetensors,onnx,gguf}",
        help="safetensors (default): a transformers model dir, adapter merged in; onnx: "
        "model.onnx for ONNX Runtime (classification, token classification, QA); gguf: a GGUF "
        "file",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="onnx: int8 weights (onnxruntime dynamic quantisation), checked on the dev set",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max abs logit difference from the run's own (safetensors: merged vs unmerged; "
        "onnx: ONNX Runtime vs PyTorch); default 1e-4",
    )
    p.add_argument(
        "--max-metric-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="onnx --quantize int8: the most the dev metric may drop against fp32, in points "
        "(default 0.5); larger accepts a bigger loss",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.export import export_run

        result = export_run(
            a.run_dir,
            a.out,
            a.format,
            a.overwrite,
            a.device,
            tolerance=a.tolerance,
            quantize=a.quantize,
            max_metric_drop=a.max_metric_drop,
        )
        print(_exported(a.format, result))

    p.set_defaults(run=run)


def _exported(fmt: str, result: dict) -> str:
    """What `lmadapt export` says it wrote and what its check measured."""
    out = result["out_dir"]
    if fmt == "safetensors":
        return (
            f"merged {result['method']} model written to {out} (max abs logit diff "
            f"{result['max_abs_diff']:.2e}, tolerance {result['tolerance']:g})"
        )
    if fmt != "onnx":
        return f"{fmt} export written to {out}"
    lines = [
        f"ONNX model ({result['quantize'] or 'fp32'}) written to {out}: fp32 ONNX Runtime vs "
        f"PyTorch max abs logit diff {result['max_abs_diff']:.2e} (tolerance "
        f"{result['tolerance']:g})"
    ]
    q = result.get("int8")
    if q:
        dev = q["dev"]
        if dev is None:
            lines.append(f"int8: {q['note']}")
        else:
            lines.append(
                f"int8: dev {dev['metric']} {dev['fp32']:.4f} -> {dev['int8']:.4f} (drop "
                f"{dev['drop_points']:.2f} points, allowed {q['max_metric_drop']:g}); "
                f"see {out}/report.md"
            )
    return "\n".join(lines)


@command(
    "continual", "train a task stream: naive, ewc, l2, replay, lwf or adapters", api="run_continual"
)
def _continual(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML continual config (a stream of tasks)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy=ewc")
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated: one run each under output_dir/<strategy> + summary.md",
    )
    _overrides_after_options(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.continual import run_continual, run_continual_many

        if a.strategies:
            names = [s.strip() for s in a.strategies.split(",") if s.strip()]
            out = Path(run_continual_many(a.config, names, a.overrides)["output_dir"])
            _show(out / "summary.md", f"written to {out}")
        else:
            out = Path(run_continual(a.config, a.overrides)["output_dir"])
            _show(RunDir(out).report, f"written to {out}")

    p.set_defaults(run=run)


@command(
    "distill",
    "distil a teacher (run dir or prompted LLM) into a smaller student",
    api="run_distill",
)
def _distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML distillation config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. alpha=1.0")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.distill import run_distill

        out = Path(run_distill(a.config, a.overrides)["run_dir"])
        _show(RunDir(out).report, f"run directory: {out}")

    p.set_defaults(run=run)


@command(
    "generate",
    "generate text with a generation run or a bare causal LM (--prompt / --file)",
    api="generate",
)
def _generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="run directory or model name/path")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", help="data file of prompts (alpaca, sharegpt, messages or text)")
    p.add_argument("--out", help="JSONL output for --file (default: FILE stem + .generated.jsonl)")
    p.add_argument("--system", help="system prompt for --prompt")
    _decoding_args(p)
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.generate import generate, generate_file, load_generator

        if not a.prompt and not a.file:
            raise LmadaptError("generate needs --prompt TEXT or --file FILE")
        gen = load_generator(a.source, device=a.device)
        settings = _decoding_settings(a)
        for text in generate(gen, a.prompt, settings, a.system) if a.prompt else []:
            print(text)
        if a.file:
            out = a.out or str(Path(a.file).with_suffix("")) + ".generated.jsonl"
            n = generate_file(gen, a.file, out, settings)
            print(f"{n} generations written to {out}", file=sys.stderr)

    p.set_defaults(run=run)


@command(
    "chat", "interactive chat in the terminal with a generation run or a bare causal LM", api="chat"
)
def _chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="run directory or model name/path")
    p.add_argument("--system", help="system prompt")
    _decoding_args(p)
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.generate import chat

        chat(a.source, sys.stdin, sys.stdout, _decoding_settings(a), a.system, a.device)

    p.set_defaults(run=run)


@command(
    "evaluate-model",
    "score a base model (or a run) on a config's dev/test data, untuned",
    api="evaluate_base",
)
def _evaluate_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config: its data and task settings are used")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_eval_samples=50")
    p.add_argument("--model", help="model name/path or run directory (default: the config's)")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.generate import evaluate_base

        print(json.dumps(evaluate_base(a.config, a.overrides, a.model, a.device), indent=2))

    p.set_defaults(run=run)


def _device_arg(p: argparse.ArgumentParser) -> None:
    """`--device`: spelling checked here, availability when the command starts (before loading)."""

    def spelling(value: str) -> str:
        from lmadapt.schema import check_device_name

        try:
            return check_device_name(value)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(e.message) from None

    p.add_argument(
        "--device",
        default="auto",
        type=spelling,
        help="where the model runs: auto (a CUDA GPU when present), cpu, cuda, cuda:N or mps",
    )


def _decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, help="default: the run's task.max_new_tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-beams", type=int, help="beam search width (default: the run's)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)


def _decoding_settings(a: argparse.Namespace) -> dict:
    """Decoding flags as overrides of a run's settings, checked before any model loads."""
    from lmadapt.decoding import GenerationSettings
    from lmadapt.errors import ConfigError

    flags = {
        "max_new_tokens": a.max_new_tokens,
        "do_sample": a.sample or None,
        "temperature": a.temperature,
        "top_p": a.top_p,
        "stop": a.stop,
        "seed": a.seed,
        "num_beams": a.num_beams,
    }
    try:
        GenerationSettings(**{k: v for k, v in flags.items() if v is not None})
    except ConfigError as e:
        raise LmadaptError(f"--{e.field.replace('_', '-')} {e.message}") from None
    return flags


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
    """Run one command; a user's error is one line on stderr and exit code 2, never a traceback
    (Ctrl-C: 130, as shells expect)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        quiet_libraries()
        args.run(args)
    except LmadaptError as e:
        print(f"lmadapt: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave: unreadable, unwritable, disk full
        where = f": {e.filename}" if e.filename else ""
        print(f"lmadapt: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmadapt: interrupted", file=sys.stderr)
        return 130
    return 0


@command(
    "prompt",
    "evaluate a frozen model by prompting: templates, verbalizers, k-shot demos",
    api="run_prompt",
)
def _prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML prompt config (see configs/prompts/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. k=8 selection=knn")
    p.add_argument("--templates", action="store_true", help="list the named templates")

    def run(a: argparse.Namespace) -> None:
        from lmadapt.prompting.runner import run_prompt
        from lmadapt.prompting.templates import named_templates

        if a.templates:
            print("\n".join(named_templates()))
            return
        if not a.config:
            raise LmadaptError("prompt needs a CONFIG.yaml (or --templates)")
        metrics = run_prompt(a.config, a.overrides)
        out = Path(metrics["output_dir"])
        _show(RunDir(out).report, f"output directory: {out}")

    p.set_defaults(run=run)


@command(
    "robustness",
    "score a finished run on seeded perturbations of a labelled data file",
    api="robustness",
)
def _robustness(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("data")
    p.add_argument("--format", default="auto")
    p.add_argument("--only", help="comma-separated perturbation names (default: every one)")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbations (>= 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import robustness

        only = [n.strip() for n in a.only.split(",") if n.strip()] if a.only else None
        result = robustness(a.run_dir, a.data, a.format, a.device, a.seed, only)
        if a.json:
            print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        else:
            print(result.markdown(f"Robustness on `{a.data}`"))

    p.set_defaults(run=run)


@command(
    "explain",
    "per-word attributions of a finished run's predictions (JSON, HTML page)",
    api="explain",
)
def _explain(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*")
    p.add_argument("--file", help="csv/tsv/jsonl file with the run's text column")
    p.add_argument("--format", default="auto")
    p.add_argument(
        "--method",
        choices=["ig", "occlusion"],
        default="ig",
        help="integrated gradients (default) or leave-one-word-out",
    )
    p.add_argument("--label", help="explain this label (NER: entity type) instead of the predicted")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument("--html", metavar="OUT.html", help="also write a page with highlighted words")
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.api import explain
        from lmadapt.evaluate.explain import html_page
        from lmadapt.io import write_text

        if not a.texts and not a.file:
            raise LmadaptError("explain needs TEXT arguments or --file")
        rows = explain(a.run_dir, a.texts, a.file, a.format, a.method, a.label, a.steps, a.device)
        for i, row in enumerate(rows, start=1):
            print(json.dumps(row, ensure_ascii=False))
            if "truncated" in row:
                cut = row["truncated"]
                print(
                    f"lmadapt: text {i}: the model reads only its first {cut['words_scored']} of "
                    f"{cut['words']} words; the rest are not scored",
                    file=sys.stderr,
                )
        if a.html:
            write_text(a.html, html_page(rows, f"lmadapt explain {Path(a.run_dir).name}"))

    p.set_defaults(run=run)


@command(
    "ui",
    "web dashboard of the runs under a directory: curves, reports, compare, playground",
    api="ui",
)
def _ui(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_root", nargs="?", default="runs", metavar="RUNS_ROOT")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--allow-no-auth",
        action="store_true",
        help="bind a non-loopback --host although the dashboard has no authentication",
    )
    _allowed_host_arg(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _device_arg(p)

    def run(a: argparse.Namespace) -> None:
        from lmadapt.serve.settings import ServeSettings
        from lmadapt.ui import ui

        settings = ServeSettings.from_flags(a)
        ui(a.runs_root, settings, a.log_level)

    p.set_defaults(run=run)


@command(
    "auto",
    "try the routes that fit the data within a time budget; keep the best as OUT/winner",
    api="auto",
)
def _auto(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "train", help="labelled training file (csv, tsv, jsonl, CoNLL; preference pairs)"
    )
    p.add_argument("dev", nargs="?", help="dev file; default: a stratified share of TRAIN")
    p.add_argument(
        "--budget",
        default="10m",
        help="time for the whole command from its start, loading, scoring and --test "
        "included: 90s, 10m, 1h, 1h30 (10m)",
    )
    p.add_argument("--out", default="runs/auto", help="output directory (runs/auto)")
    p.add_argument(
        "--test",
        dest="test_file",
        help="test file, scored for the winner only (never for selection)",
    )
    p.add_argument(
        "--task",
        help="classification, preference or token_classification (default: inferred)",
    )
    p.add_argument(
        "--prefer",
        choices=["accuracy", "speed"],
        default="accuracy",
        help="speed: also distil the best head classifier into a smaller student",
    )
    p.add_argument("--template", help="prompt template for the prompting routes (e.g. sentiment)")
    p.add_argument(
        "--verbalizer", metavar="LABEL=WORD,...", help="words the prompting routes score"
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="ROUTE=MODEL",
        help="replace a route's model (repeatable)",
    )
    p.add_argument("--format", dest="fmt", default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _device_arg(p)
    passed = [
        "budget",
        "out",
        "test_file",
        "task",
        "prefer",
        "template",
        "fmt",
        "seed",
        "device",
        "overwrite",
        "started",
    ]

    def pairs(text: str, option: str) -> dict[str, str]:
        out = {}
        for item in filter(None, text.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise LmadaptError(f"{option}: expected KEY=VALUE, got {item!r}")
            out[key.strip()] = value.strip()
        return out

    def run(a: argparse.Namespace) -> None:
        from lmadapt.auto import auto

        result = auto(
            a.train,
            a.dev,
            verbalizer=pairs(a.verbalizer, "--verbalizer") if a.verbalizer else None,
            models=pairs(",".join(a.model), "--model"),
            **{name: getattr(a, name) for name in passed},
        )
        _show(RunDir(a.out).report, f"winner: {result['winner_dir']}")

    # main builds the parser first thing: the budget counts from there, library imports included
    p.set_defaults(run=run, started=time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
