"""BitFit on a base without bias terms (Llama, SmolLM2) is refused before anything is written,
instead of a traceback (generation: an empty optimizer) or a run that trains only the head."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmadapt.api import methods, train
from lmadapt.cli import main
from lmadapt.config import build_run_config
from lmadapt.errors import ConfigError
from lmadapt.methods import build_method
from lmadapt.models import resolve_model
from lmadapt.schema import parse_section
from lmadapt.tasks import TASKS, build_task
from tests.tasks.test_generation import gen_config


def _bitfit():
    from lmadapt.methods import METHODS

    return build_method(parse_section(METHODS, "name", "bitfit", "method"))


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_bitfit_refuses_a_base_without_biases(tiny_llama, kind):
    state = {"labels": ["neg", "pos"]} if kind == "classification" else None
    task = build_task(parse_section(TASKS, "type", kind, "task"), state)
    with pytest.raises(ConfigError, match="lora or ia3") as e:
        _bitfit().apply(task.build_model(resolve_model(tiny_llama)), task)
    assert e.value.field == "method"
    assert "LlamaFor" in str(e.value)


def test_bitfit_still_trains_the_biases_of_a_base_that_has_them(tiny_bert):
    task = build_task(parse_section(TASKS, "type", "classification", "task"), {"labels": ["a"]})
    model = _bitfit().apply(task.build_model(resolve_model(tiny_bert)), task)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("bert.encoder") and n.endswith(".bias") for n in trained)


def test_generation_bitfit_run_exits_2_and_writes_nothing(tmp_path, tiny_llama, capsys):
    cfg = gen_config(tmp_path, tiny_llama)
    cfg["method"] = {"name": "bitfit"}
    cfg["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "method" in err and "lora or ia3" in err and "Traceback" not in err
    assert not Path(cfg["output_dir"]).exists()


def test_classification_bitfit_on_llama_is_refused_not_head_only(run_config, tiny_llama):
    cfg = build_run_config(run_config(model=tiny_llama, method={"name": "bitfit"}))
    with pytest.raises(ConfigError, match="only the task head"):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_methods_listing_shows_no_count_where_bitfit_cannot_apply(tiny_llama):
    rows = {r["name"]: r for r in methods(tiny_llama)}
    assert rows["bitfit"]["trainable"] is None and rows["bitfit"]["total"] is None
    assert rows["lora"]["trainable"] > 0
