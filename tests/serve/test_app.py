"""HTTP serving: responses match `lmadapt.api.predict`, adapters route by name, bad requests 4xx."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmadapt.api import load_run, predict, train  # noqa: E402
from lmadapt.cli import main  # noqa: E402
from lmadapt.config import build_run_config  # noqa: E402
from lmadapt.errors import LmadaptError  # noqa: E402
from lmadapt.serve.app import create_app  # noqa: E402
from lmadapt.serve.batching import MicroBatcher, QueueFullError  # noqa: E402
from lmadapt.serve.settings import ServeSettings  # noqa: E402

TEXTS = ["the film was good", "the plot was awful", "the music was superb and lovely"]


def _train(root: Path, tiny_bert: str, name: str, method: str, labels: tuple[str, str], seed: int):
    """A one-epoch run on a 48-row set where the adjective decides between `labels`."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(48):
        pos = i % 2 == 0
        adj = rng.choice(["good", "great", "superb"] if pos else ["bad", "awful", "dull"])
        lines.append(f"the {rng.choice(['film', 'plot', 'cast'])} was {adj},{labels[not pos]}")
    data = root / f"{name}.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": method},
        "data": {"train": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "threads": 1, "seed": seed},
        "output_dir": str(root / name),
    }
    return train(build_run_config(cfg))["run_dir"]


def _train_ner(root: Path, tiny_bert: str) -> str:
    """A one-epoch LoRA NER run: a name, then a place (IOB2 tags)."""
    rng = random.Random(4)
    rows = []
    for _ in range(32):
        name, place = rng.choice(["Alice", "Bob", "Hiro"]), rng.choice(["Paris", "Lima"])
        rows.append(
            {"tokens": [name, "flew", "to", place, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]}
        )
    data = root / "ner.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": tiny_bert,
        "task": {"type": "token_classification"},
        "method": {"name": "lora"},
        "data": {"train": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "threads": 1},
        "output_dir": str(root / "delta"),
    }
    return train(build_run_config(cfg))["run_dir"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert) -> dict[str, str]:
    """alpha and beta: LoRA adapters on one base (different label names); gamma: BitFit;
    delta: LoRA NER (same base weights, but another head: its own model)."""
    root = tmp_path_factory.mktemp("serve-runs")
    return {
        "alpha": _train(root, tiny_bert, "alpha", "lora", ("pos", "neg"), 1),
        "beta": _train(root, tiny_bert, "beta", "lora", ("yes", "no"), 2),
        "gamma": _train(root, tiny_bert, "gamma", "bitfit", ("up", "down"), 3),
        "delta": _train_ner(root, tiny_bert),
    }


SETTINGS = ServeSettings(max_batch=16, max_wait_ms=30, max_texts=8, max_chars=200)


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(list(runs.values()), SETTINGS)) as c:
        yield c


NER_TEXTS = ["Alice flew to Paris .", "Hiro flew to Lima today ."]


@pytest.fixture(scope="module")
def expected(runs) -> dict[str, list[dict]]:
    return {
        name: predict(load_run(d), NER_TEXTS if name == "delta" else TEXTS)
        for name, d in runs.items()
    }


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and g["label"] == w["label"]
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)


# ---------------------------------------------------------------------- happy paths


def test_health_and_models_share_one_base(client):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"] == ["alpha", "beta", "delta", "gamma"]
    # alpha+beta share one base; gamma has its own weights, delta another head and task
    assert health["base_models_in_memory"] == 3
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["alpha"]["shares_base_with"] == ["beta"]
    assert cards["gamma"]["shares_base_with"] == []
    assert cards["beta"]["labels"] == ["no", "yes"]
    assert cards["gamma"]["method"] == "bitfit"
    assert cards["delta"]["task"] == "token_classification"


def test_ner_equals_api_predict(client, expected):
    r = client.post("/v1/ner", json={"model": "delta", "texts": NER_TEXTS})
    assert r.status_code == 200, r.text
    got, want = r.json()["results"], expected["delta"]
    assert [row["text"] for row in got] == NER_TEXTS
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["tokens"], g["tags"]) == (w["tokens"], w["tags"])
        assert [(e["type"], e["start"], e["end"]) for e in g["entities"]] == [
            (e["type"], e["start"], e["end"]) for e in w["entities"]
        ]
        for ge, we in zip(g["entities"], w["entities"]):
            assert ge["score"] == pytest.approx(we["score"], abs=1e-5)


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
def test_classify_equals_api_predict(client, expected, name):
    r = client.post("/v1/classify", json={"model": name, "texts": TEXTS})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == name
    _same(r.json()["results"], expected[name])


def test_concurrent_requests_route_to_their_adapter_and_batch(client, expected):
    """Interleaved requests for two adapters on one base: each answer is its own run's."""
    jobs = [("alpha", i) for i in range(12)] + [("beta", i) for i in range(12)]
    jobs.sort(key=lambda j: j[1])

    def call(job):
        name, i = job
        text = TEXTS[i % len(TEXTS)]
        r = client.post("/v1/classify", json={"model": name, "texts": [text]})
        return name, i, r

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(call, jobs))
    for name, i, r in out:
        assert r.status_code == 200, r.text
        _same(r.json()["results"], [expected[name][i % len(TEXTS)]])
    assert client.get("/health").json()["largest_batch"] > 1


def test_single_served_run_needs_no_model_field(runs, expected):
    with TestClient(create_app([runs["alpha"]])) as c:
        r = c.post("/v1/classify", json={"texts": TEXTS[:1]})
        assert r.status_code == 200
        _same(r.json()["results"], expected["alpha"][:1])


def test_openapi_schema_lists_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/classify",
        "/v1/ner",
        "/v1/generate",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
    ):
        assert path in paths


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name", ["nope", "../alpha", "/tmp", "alpha/../beta", "", "ALPHA", "alpha\x00"]
)
def test_unknown_model_is_404_listing_names(client, name):
    r = client.post("/v1/classify", json={"model": name, "texts": ["x"]})
    assert r.status_code == 404
    assert "served models: alpha, beta, delta, gamma" in r.json()["detail"]


def test_model_required_when_several_served(client):
    r = client.post("/v1/classify", json={"texts": ["x"]})
    assert r.status_code == 400 and "'model' is required" in r.json()["detail"]


@pytest.mark.parametrize(
    ("path", "body", "needs"),
    [
        ("/v1/ner", {"model": "alpha", "texts": ["x"]}, "token_classification"),
        ("/v1/classify", {"model": "delta", "texts": ["x"]}, "classification"),
        ("/v1/generate", {"model": "delta", "prompt": "x"}, "generation"),
        (
            "/v1/chat/completions",
            {
                "model": "gamma",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "temperature": 0.2,
            },
            "generation",
        ),
    ],
)
def test_wrong_task_kind_is_400(client, path, body, needs):
    r = client.post(path, json=body)
    assert r.status_code == 400
    kind = "token_classification" if body["model"] == "delta" else "classification"
    assert (
        r.json()["detail"]
        == f"model {body['model']!r} is a {kind} model; {path} needs a {needs} model"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "alpha", "texts": ["x"] * 9}, 413, "9 texts in one request; the limit is 8"),
        ({"model": "alpha", "texts": ["ok", "y" * 201]}, 413, "texts[1] has 201 characters"),
        ({"model": "alpha", "texts": ["ok", "  "]}, 422, "texts[1] is empty"),
        # a JSON \\u escape of a lone surrogate: valid JSON, but no tokenizer takes it
        ('{"model": "alpha", "texts": ["\\ud800"]}', 422, "unpaired surrogate"),
    ],
)
def test_input_limits(client, body, status, message):
    raw = body if isinstance(body, str) else json.dumps(body)
    r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert message in r.json()["detail"]


def test_max_new_tokens_limit(client):
    r = client.post("/v1/generate", json={"model": "alpha", "prompt": "x", "max_new_tokens": 10**6})
    assert r.status_code == 413 and "exceeds the server limit 512" in r.json()["detail"]
    msgs = [{"role": "user", "content": "hi"}]
    r = client.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": msgs, "max_tokens": 10**6}
    )
    assert r.status_code == 413


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[]",
        b'{"model": "alpha"}',
        b'{"model": "alpha", "texts": []}',
        b'{"model": "alpha", "texts": "just one string"}',
        b'{"model": "alpha", "texts": [1, 2]}',
        b'{"model": "alpha", "texts": [null]}',
        b'{"model": 5, "texts": ["x"]}',
        b'{"model": "alpha", "texts": ["x"], "txets": ["typo"]}',
        b'\xff\xfe{"texts": ["x"]}',
    ],
)
def test_malformed_body_is_422(client, raw):
    r = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_create_app_refuses_duplicate_names_and_non_runs(runs, tmp_path):
    twin = tmp_path / "alpha"
    twin.mkdir()
    with pytest.raises(LmadaptError, match="not a finished lmadapt run"):
        create_app([str(twin)])
    import shutil

    shutil.copytree(runs["alpha"], twin, dirs_exist_ok=True)
    with pytest.raises(LmadaptError, match="two runs are named 'alpha'"):
        create_app([runs["alpha"], str(twin)])


def test_cli_serve_rejects_bad_limits(runs, capsys):
    assert main(["serve", runs["alpha"], "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


# ---------------------------------------------------------------------- the micro-batcher


def test_batcher_splits_results_and_never_mixes_keys():
    seen: list[tuple[str, list[int]]] = []
    gate = threading.Event()

    def process(key, items):
        gate.wait(5)
        seen.append((key, list(items)))
        return [(key, x * 10) for x in items]

    b = MicroBatcher(process, max_batch=100, max_wait_ms=200)
    try:
        futures = [b.submit("a" if i % 2 else "b", [i, i + 100]) for i in range(6)]
        gate.set()
        for i, f in enumerate(futures):
            key = "a" if i % 2 else "b"
            assert f.result(5) == [(key, i * 10), (key, (i + 100) * 10)]
    finally:
        b.close()
    assert all(len({k}) == 1 for k, _ in seen)
    assert sum(len(items) for _, items in seen) == 12
    assert b.stats.largest > 2  # several requests shared a forward pass


def test_batcher_failure_reaches_every_waiting_request_and_worker_survives():
    def process(key, items):
        if key == "bad":
            raise ValueError("boom")
        return items

    b = MicroBatcher(process, max_batch=8, max_wait_ms=20)
    try:
        bad = [b.submit("bad", [1]) for _ in range(3)]
        for f in bad:
            with pytest.raises(ValueError, match="boom"):
                f.result(5)
        assert b.submit("good", [7]).result(5) == [7]
    finally:
        b.close()


def test_batcher_sheds_load_when_queue_is_full():
    release = threading.Event()
    b = MicroBatcher(lambda k, items: (release.wait(5), items)[1], 1, 0, max_queue=2)
    try:
        first = b.submit("k", [0])
        time.sleep(0.1)  # the worker is now busy with `first`
        b.submit("k", [1])
        b.submit("k", [2])
        with pytest.raises(QueueFullError):
            b.submit("k", [3])
        release.set()
        assert first.result(5) == [0]
    finally:
        release.set()
        b.close()
