"""`lmadapt serve --runs-dir DIR`: every run under DIR, loaded when first named, the least
recently used unloaded within the memory budget, runs added later found; LoRA adapters of one
base share one model and, where peft can mix their heads, one forward pass."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lmadapt.api import load_run, predict  # noqa: E402
from lmadapt.cli import main  # noqa: E402
from lmadapt.serve import catalog  # noqa: E402
from lmadapt.serve.app import create_app  # noqa: E402
from lmadapt.serve.settings import ServeSettings  # noqa: E402
from tests.serve.test_app import NER_TEXTS, TEXTS, _train, _train_ner  # noqa: E402

SETTINGS = ServeSettings(max_batch=64, max_wait_ms=50, max_texts=8, max_chars=200)


def variants(run: str, out: Path, n: int, prefix: str) -> list[Path]:
    """`n` copies of a LoRA run, each with its adapter's weights (LoRA matrices and head copy)
    scaled by its own random factors: distinct runs that answer differently."""
    made = []
    for i in range(n):
        copy = Path(shutil.copytree(run, out / f"{prefix}{i:02d}"))
        weights = copy / "model" / "adapter_model.safetensors"
        g = torch.Generator().manual_seed(i)
        tensors = {
            k: v * (1 + 0.8 * torch.randn(v.shape, generator=g))
            for k, v in load_file(weights).items()
        }
        save_file(tensors, weights)
        made.append(copy)
    return made


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runs-dir-train")
    return {
        "ner": _train_ner(root, tiny_bert),
        "cls": _train(root, tiny_bert, "cls", "lora", ("pos", "neg"), 1),
    }


@pytest.fixture(autouse=True)
def no_grace(monkeypatch):
    """Unload as soon as a run is idle: the tests' requests come back to back."""
    monkeypatch.setattr(catalog, "GRACE_SECONDS", 0.0)


def _same(got: list[dict], want: list[dict]) -> None:
    """Equal predictions, scores within float noise (a batch's padding differs)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in g:
            if isinstance(g[k], float):
                assert g[k] == pytest.approx(w[k], abs=1e-5), k
            elif k == "probabilities":
                assert g[k] == pytest.approx(w[k], abs=1e-5)
            elif k == "entities":
                assert [(e["type"], e["start"], e["end"]) for e in g[k]] == [
                    (e["type"], e["start"], e["end"]) for e in w[k]
                ]
                assert [e["score"] for e in g[k]] == pytest.approx(
                    [e["score"] for e in w[k]], abs=1e-5
                )
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("kind", ["ner", "cls"])
def test_twenty_lora_runs_on_one_base_answer_as_each_alone(kind, trained, tmp_path):
    """20 adapters (NER; sentence classification, whose BERT pooler LoRA copies as its linear
    layer): one base in memory, concurrent requests for all of them mixed into shared forward
    passes, and each answer the one its run gives loaded alone."""
    path, texts = ("/v1/ner", NER_TEXTS) if kind == "ner" else ("/v1/classify", TEXTS)
    runs = variants(trained[kind], tmp_path, 20, kind)
    expected = {r.name: predict(load_run(r), texts) for r in runs}
    assert len({str(e) for e in expected.values()}) > 10  # the variants really differ
    with TestClient(create_app(None, SETTINGS, runs_dir=tmp_path)) as c:
        assert c.get("/health").json()["loaded"] == []  # nothing loaded before it is asked for
        for r in runs[:2]:  # cold: each loads (the second as an adapter of the first's model)
            assert c.post(path, json={"model": r.name, "texts": texts}).status_code == 200

        def ask(name: str) -> list[dict]:
            got = c.post(path, json={"model": name, "texts": texts})
            assert got.status_code == 200, got.text
            return got.json()["results"]

        names = [r.name for r in runs] * 3
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, names))
        for name, got in zip(names, answers):
            _same(got, expected[name])
        health = c.get("/health").json()
        assert len(health["loaded"]) == 20 and health["base_models_in_memory"] == 1
        assert health["mixed_batches"] >= 1  # several adapters in one forward pass
        assert len(c.app.state.server.groups) == 1
        entries = c.app.state.server.catalog.entries.values()
        assert len({id(e.run.tokenizer) for e in entries}) == 1  # one tokenizer for all 20
        cards = c.get("/v1/models").json()["data"]
        assert len(cards) == 20 and all(card["loaded"] for card in cards)


def test_least_recently_used_runs_are_unloaded_within_the_budget(trained, tmp_path):
    """With room for the base and two adapters, a third run unloads the least recently used
    one, which answers as before when asked again."""
    runs = variants(trained["cls"], tmp_path / "runs", 4, "cls")
    sizes = {}
    with TestClient(create_app(None, SETTINGS, runs_dir=tmp_path / "runs")) as c:
        for n, r in enumerate(runs[:2], start=1):
            assert c.post("/v1/classify", json={"model": r.name, "texts": TEXTS}).status_code == 200
            sizes[n] = c.get("/health").json()["weights_bytes"]
    adapter = sizes[2] - sizes[1]
    assert 0 < adapter < sizes[1] / 4  # an adapter is a small part of a base in memory
    budget = (sizes[2] + adapter / 2) / 2**20
    settings = ServeSettings(**{**SETTINGS.__dict__, "memory_budget_mb": budget})
    expected = {r.name: predict(load_run(r), TEXTS) for r in runs}
    with TestClient(create_app(None, settings, runs_dir=tmp_path / "runs")) as c:

        def ask(name: str) -> None:
            got = c.post("/v1/classify", json={"model": name, "texts": TEXTS})
            assert got.status_code == 200, got.text
            _same(got.json()["results"], expected[name])

        for r in runs[:3]:
            ask(r.name)
        health = c.get("/health").json()
        assert health["loaded"] == sorted(r.name for r in runs[1:3])  # the first one went
        assert health["unloads"] == 1 and health["weights_bytes"] <= budget * 2**20
        ask(runs[0].name)  # loaded again, the same answers; now runs[1] is the oldest
        assert c.get("/health").json()["loaded"] == sorted([runs[0].name, runs[2].name])
        cards = {card["id"]: card for card in c.get("/v1/models").json()["data"]}
        unloaded = cards[runs[3].name]
        assert not unloaded["loaded"] and unloaded["labels"] is None  # read once it loads
        assert (unloaded["task"], unloaded["method"]) == ("classification", "lora")
        assert cards[runs[2].name]["labels"] == cards[runs[0].name]["labels"]


def test_runs_added_later_are_found_and_unfinished_ones_are_not(trained, tmp_path):
    root = tmp_path / "runs"
    first, second = variants(trained["cls"], tmp_path / "made", 2, "cls")
    shutil.copytree(first, root / first.name)
    with TestClient(create_app(None, SETTINGS, runs_dir=root)) as c:
        assert c.get("/health").json()["models"] == [first.name]
        one = c.post("/v1/classify", json={"texts": TEXTS})  # the only run: no name needed
        assert one.status_code == 200 and one.json()["model"] == first.name
        missing = c.post("/v1/classify", json={"model": second.name, "texts": TEXTS})
        assert missing.status_code == 404 and first.name in missing.json()["detail"]
        # a run still training (no metrics.json) and a hidden temporary directory are not runs
        unfinished = Path(shutil.copytree(second, root / "training"))
        (unfinished / "metrics.json").unlink()
        shutil.copytree(second, root / ".export-tmp")
        shutil.copytree(second, root / second.name)
        catalog_ = c.app.state.server.catalog
        catalog_.scan(force=True)
        got = c.post("/v1/classify", json={"model": second.name, "texts": TEXTS})
        assert got.status_code == 200, got.text
        _same(got.json()["results"], predict(load_run(second), TEXTS))
        assert c.get("/health").json()["models"] == sorted([first.name, second.name])
        for name in ("training", ".export-tmp"):
            assert c.post("/v1/classify", json={"model": name, "texts": TEXTS}).status_code == 404
        # more than one run: a request must name its model
        assert c.post("/v1/classify", json={"texts": TEXTS}).status_code == 400


def test_a_model_larger_than_the_budget_is_refused_by_name(trained, tmp_path):
    (run,) = variants(trained["cls"], tmp_path / "runs", 1, "cls")
    settings = ServeSettings(**{**SETTINGS.__dict__, "memory_budget_mb": 0.01})
    with TestClient(create_app(None, settings, runs_dir=tmp_path / "runs")) as c:
        got = c.post("/v1/classify", json={"model": run.name, "texts": TEXTS})
        assert got.status_code == 503
        assert "more than the memory budget" in got.json()["detail"]
        assert "--memory-budget-mb" in got.json()["detail"]


def test_the_command_takes_run_directories_or_a_runs_dir(trained, tmp_path, capsys):
    assert main(["serve"]) == 2
    assert "give run directories or --runs-dir DIR" in capsys.readouterr().err
    assert main(["serve", trained["cls"], "--runs-dir", str(tmp_path)]) == 2
    assert main(["serve", "--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--runs-dir", str(tmp_path), "--memory-budget-mb", "0"]) == 2
    assert "--memory-budget-mb" in capsys.readouterr().err
