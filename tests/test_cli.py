import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmadapt.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_documented_command_exists():
    documented = set(re.findall(r"^lmadapt ([\w-]+)", (ROOT / "README.md").read_text(), re.M))
    assert documented, "README documents no command"
    assert documented <= set(COMMANDS), documented - set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_a_thin_layer_over_a_typed_api_function(name):
    """Each command names its API function (cli.API); that function is exported by the
    `lmadapt` package, typed, documented, and is what the command's handler calls."""
    import inspect

    import lmadapt
    from lmadapt.cli import API, build_parser

    fn = getattr(lmadapt, API[name])
    assert API[name] in lmadapt.__all__
    assert callable(fn) and fn.__doc__, API[name]
    sig = inspect.signature(fn)
    assert sig.return_annotation is not inspect.Signature.empty, API[name]
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{API[name]}({p.name})"
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    handler = sub.choices[name].get_default("run")
    assert fn.__name__ in handler.__code__.co_names, f"{name} does not call {API[name]}"


def test_train_eval_predict_round_trip(run_config, tmp_path, sentiment_files, capsys):
    import yaml

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config()))
    assert main(["train", str(cfg_path), "train.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "# lmadapt run" in out and "Confusion matrix" in out
    run = str(tmp_path / "run")
    assert main(["eval", run, str(sentiment_files["dev"]), "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    assert main(["predict", run, "the film was good", "the plot was bad"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and '"probabilities"' in lines[0]
    assert main(["predict", run, "--file", str(sentiment_files["dev"])]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 24


def test_predict_on_missing_run_exits_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nope"), "x"]) == 2
    assert "not a finished lmadapt run" in capsys.readouterr().err


def test_models_and_methods_list(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "smollm2-135m-instruct" in out
    assert main(["methods", "--no-count"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("full", "bitfit", "lora"))


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_console_script_runs(args):
    r = subprocess.run(
        [sys.executable, "-c", "from lmadapt.cli import main; main()", *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "usage" in r.stdout


@pytest.mark.parametrize(
    "argv, option",
    [
        (
            ["continual", "c.yaml", "--strategies", "naive,ewc", "output_dir=x", "seed=3"],
            "strategies",
        ),
        (["compare", "c.yaml", "--methods", "lora,ia3", "output_dir=x", "seed=3"], "methods"),
        (
            ["hpo", "c.yaml", "--space", "s.yaml", "--trials", "2", "output_dir=x", "seed=3"],
            "space",
        ),
    ],
)
def test_overrides_may_follow_options(argv, option):
    from lmadapt.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.overrides == ["output_dir=x", "seed=3"]
    assert getattr(args, option)


def test_api_names_stay_functions_after_their_namesake_modules_load():
    """`lmadapt.train` is the function even once the lmadapt/train package is imported (which
    sets the parent's attribute): a second `lmadapt.train(...)` used to get the module."""
    import importlib

    import lmadapt

    for module in ("train.loop", "evaluate.metrics", "generate", "models", "methods", "serve"):
        importlib.import_module(f"lmadapt.{module}")
    for name in ("train", "evaluate", "generate", "models", "methods", "serve"):
        fn = getattr(lmadapt, name)
        assert callable(fn) and not isinstance(fn, type(lmadapt)), name
    assert lmadapt.train.__module__ == "lmadapt.api"
