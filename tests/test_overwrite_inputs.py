"""#29 item 3: `overwrite` never deletes what the command is about to read. Replacing an output
directory that holds one of the run's inputs (data, model, the run being exported) is refused,
exit 2, with both the input and the directory left as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmadapt.cli import main
from lmadapt.errors import ConfigError
from lmadapt.rundir import MARKER, check_output_dir
from tests.test_dependable import _train_cli


def _lmadapt_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text("{}")
    return path


def test_train_refuses_to_overwrite_the_directory_holding_its_data(
    run_config, sentiment_files, tmp_path, capsys
):
    out = _lmadapt_dir(tmp_path / "R")
    train_csv = shutil.copy(sentiment_files["train"], out / "mytrain.csv")
    dev_csv = shutil.copy(sentiment_files["dev"], out / "mydev.csv")
    cfg = run_config(data={"train": str(train_csv), "dev": str(dev_csv)}, output_dir=str(out))
    code = _train_cli(tmp_path, cfg, "overwrite=true")
    assert code == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "mytrain.csv" in err and "Traceback" not in err
    assert Path(train_csv).is_file() and Path(dev_csv).is_file() and (out / MARKER).is_file()


def test_train_refuses_to_overwrite_the_directory_holding_its_model(
    run_config, tiny_bert, tmp_path
):
    out = _lmadapt_dir(tmp_path / "R")
    model = shutil.copytree(tiny_bert, out / "base")
    cfg = run_config(model=str(model), output_dir=str(out))
    assert _train_cli(tmp_path, cfg, "overwrite=true") == 2
    assert (Path(model) / "config.json").is_file()


def test_export_refuses_to_replace_the_run_it_exports(run_config, tmp_path, capsys):
    assert _train_cli(tmp_path, run_config(train={"max_steps": 2})) == 0
    run = Path(run_config()["output_dir"])
    code = main(["export", str(run), "--merge", str(run), "--overwrite"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert (run / "metrics.json").is_file() and (run / "model").is_dir()


@pytest.mark.parametrize("nested", [["a"], ["a", "b", "c"]])
def test_any_field_naming_a_path_inside_is_protected(tmp_path, nested):
    out = _lmadapt_dir(tmp_path / "out")
    inner = out.joinpath(*nested)
    inner.mkdir(parents=True)
    (inner / "x.jsonl").write_text("{}\n")
    inputs = {"stream": [{"train": str(inner / "x.jsonl")}], "output_dir": str(out)}
    with pytest.raises(ConfigError, match=r"stream\[0\]\.train"):
        check_output_dir(out, True, inputs=inputs)
    # the output directory's own field, and inputs elsewhere, are fine
    check_output_dir(out, True, inputs={"output_dir": str(out), "data": str(tmp_path)})


def test_an_input_reached_through_a_link_is_protected(tmp_path):
    out = _lmadapt_dir(tmp_path / "out")
    (out / "train.csv").write_text("text,label\n")
    link = tmp_path / "train_link.csv"
    link.symlink_to(out / "train.csv")
    with pytest.raises(ConfigError, match="train_link"):
        check_output_dir(out, True, inputs={"data": {"train": str(link)}})
