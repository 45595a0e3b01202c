"""HTTP serving: responses match `lmadapt.api.predict`, adapters route by name, bad requests 4xx."""

from __future__ import annotations

import asyncio
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
from lmadapt.serve.guards import BodyLimit  # noqa: E402
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
    # alpha+beta are one model; delta (another head and task) uses the same base weights;
    # gamma (BitFit) saved a whole model of its own
    assert health["base_models_in_memory"] == 2
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["alpha"]["shares_base_with"] == ["beta", "delta"]
    assert cards["delta"]["shares_base_with"] == ["alpha", "beta"]
    assert cards["gamma"]["shares_base_with"] == []
    assert cards["beta"]["labels"] == ["no", "yes"]
    assert cards["gamma"]["method"] == "bitfit"
    assert cards["delta"]["task"] == "token_classification"


def test_runs_of_other_methods_and_tasks_share_the_base_and_answer_as_alone(
    runs, tiny_bert, tmp_path
):
    """The reported mix: LoRA and IA3 classifiers and a LoRA NER run on one base, and a run with
    weights of its own (BitFit). peft cannot hold LoRA and IA3 in one model, so these are three
    models, but one copy of the base's weights; every answer equals the run loaded alone."""
    served = {
        "alpha": runs["alpha"],
        "epsilon": _train(tmp_path, tiny_bert, "epsilon", "ia3", ("pos", "neg"), 5),
        "delta": runs["delta"],
        "gamma": runs["gamma"],
    }
    app = create_app(list(served.values()), SETTINGS)
    with TestClient(app) as c:
        assert c.get("/health").json()["base_models_in_memory"] == 2
        cards = {card["id"]: card for card in c.get("/v1/models").json()["data"]}
        assert cards["epsilon"]["shares_base_with"] == ["alpha", "delta"]
        assert cards["gamma"]["shares_base_with"] == []
        # really one tensor in memory, not just reported as one
        embeddings = {
            next(p for n, p in g.model.named_parameters() if "word_embeddings" in n).data_ptr()
            for g in app.state.server.groups
        }
        assert len(app.state.server.groups) == 4 and len(embeddings) == 2
        for name, run_dir in served.items():
            path, texts = ("/v1/ner", NER_TEXTS) if name == "delta" else ("/v1/classify", TEXTS)
            r = c.post(path, json={"model": name, "texts": texts})
            assert r.status_code == 200, r.text
            assert r.json()["results"] == predict(load_run(run_dir), texts), name


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


def test_calibrated_run_serves_temperature_scaled_probabilities(run_config):
    """task.calibrate: the served probabilities are predict's calibrated ones, not the raw."""
    cfg = build_run_config(run_config(task={"type": "classification", "calibrate": True}))
    run_dir = train(cfg)["run_dir"]
    # The random tiny model learns nothing, so its fit keeps T = 1: serve one as if fitted.
    info = json.loads((Path(run_dir) / "run.json").read_text())
    info["task"]["temperature"] = 3.0
    (Path(run_dir) / "run.json").write_text(json.dumps(info))
    run = load_run(run_dir)
    calibrated = predict(run, TEXTS)
    run.task.cfg.calibrate = False
    raw = predict(run, TEXTS)
    with TestClient(create_app([run_dir])) as c:
        r = c.post("/v1/classify", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    _same(r.json()["results"], calibrated)
    assert r.json()["results"][0]["probabilities"] != raw[0]["probabilities"]


def test_openapi_schema_lists_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/classify",
        "/v1/ner",
        "/v1/qa",
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
    needs = {
        "classification": "classification or prompt_classification",
        "generation": "generation or preference",  # a preference run answers prompts too
    }.get(needs, needs)
    openai = path == "/v1/chat/completions"  # OpenAI's error shape there
    assert (
        r.json()["error"]["message"] if openai else r.json()["detail"]
    ) == f"model {body['model']!r} is a {kind} model; {path} needs a {needs} model"


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


@pytest.mark.parametrize("flag", ["--max-batch", "--max-body-bytes"])
def test_cli_serve_rejects_bad_limits(runs, capsys, flag):
    assert main(["serve", runs["alpha"], flag, "0"]) == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------------- request body size


def test_default_body_limit_admits_the_largest_allowed_request():
    """Every text at max_chars, JSON-escaped (\\uXXXX, as json.dumps writes non-ASCII)."""
    settings = ServeSettings()
    texts = ["é" * settings.max_chars] * settings.max_texts
    body = json.dumps({"model": "m" * 200, "texts": texts})
    assert len(body) <= settings.body_limit <= len(body) + 64 * 1024


@pytest.fixture(scope="module")
def small_body_client(runs):
    """alpha, with bodies capped at 1000 bytes (the other limits would admit more)."""
    settings = ServeSettings(max_texts=8, max_chars=200, max_body_bytes=1000)
    with TestClient(create_app([runs["alpha"]], settings)) as c:
        yield c


OVER_1000_BYTES = {"model": "alpha", "texts": ["the film was good " * 10] * 7}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413(small_body_client, chunked):
    """A body the other limits admit, but over --max-body-bytes: 413 either from its
    Content-Length or, for a chunked upload (no Content-Length), from the bytes received."""
    raw = json.dumps(OVER_1000_BYTES).encode()
    assert len(raw) > 1000 and len(OVER_1000_BYTES["texts"]) <= 8
    content = iter([raw[:500], raw[500:]]) if chunked else raw
    r = small_body_client.post(
        "/v1/classify", content=content, headers={"content-type": "application/json"}
    )
    assert ("content-length" in r.request.headers) != chunked
    assert r.status_code == 413, r.text
    assert r.json()["detail"].endswith("the limit is 1000 (--max-body-bytes)")
    under = {"model": "alpha", "texts": OVER_1000_BYTES["texts"][:2]}
    assert small_body_client.post("/v1/classify", json=under).status_code == 200


def _asgi(middleware_app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]):
    """Drive an ASGI app with a request body sent in `chunks`; returns the response status and
    the chunks it read."""
    pulled: list[bytes] = []
    sent: list[dict] = []

    async def receive():
        pulled.append(chunks[len(pulled)])
        more = len(pulled) < len(chunks)
        return {"type": "http.request", "body": pulled[-1], "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(middleware_app(scope, receive, send))
    return sent[0]["status"], pulled


def test_body_limit_stops_reading_a_chunked_body_past_the_limit():
    got: list[dict] = []

    async def inner(scope, receive, send):
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = BodyLimit(inner, limit=1000)
    status, pulled = _asgi(limited, [b"x" * 100] * 100, [])
    assert status == 413 and len(pulled) == 11 and not got  # 1100 bytes read of 10000
    status, pulled = _asgi(limited, [b"x" * 100] * 10, [])
    assert status == 200 and got == [
        {"type": "http.request", "body": b"x" * 1000, "more_body": False}
    ]
    status, pulled = _asgi(limited, [b"x" * 100] * 100, [(b"content-length", b"10000")])
    assert status == 413 and not pulled  # refused on the header: nothing read


# ---------------------------------------------------------------------- what a refusal quotes


def test_validation_error_never_echoes_the_input(client):
    """FastAPI's default 422 quotes each rejected value back: 60 kB in, 60 kB out."""
    r = client.post("/v1/classify", json={"model": "alpha", "texts": "Z" * 60_000})
    assert r.status_code == 422
    assert len(r.content) < 1000 and "ZZZ" not in r.text
    assert r.json()["detail"] == [
        {"loc": ["body", "texts"], "msg": "Input should be a valid list", "type": "list_type"}
    ]


def test_validation_errors_are_bounded(client):
    r = client.post("/v1/classify", json={"model": "alpha", "texts": list(range(2000))})
    assert r.status_code == 422
    assert r.json()["error_count"] == 2000 and len(r.json()["detail"]) == 10
    assert len(r.content) < 2000
    # a request's own keys are quoted in `loc`: cut short
    r = client.post("/v1/classify", json={"model": "alpha", "texts": ["x"], "k" * 50_000: 1})
    assert r.status_code == 422 and len(r.content) < 1000
    assert r.json()["detail"][0]["loc"] == ["body", "k" * 61 + "..."]


def test_unknown_model_name_is_quoted_short(client):
    r = client.post("/v1/classify", json={"model": "m" * 50_000, "texts": ["x"]})
    assert r.status_code == 404 and len(r.content) < 1000


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


def test_batcher_never_runs_more_than_max_batch_items():
    """Requests are split across forward passes rather than overfilling one (35 items ran in
    one pass with max_batch 32 when whole requests were added to a batch)."""
    sizes: list[int] = []
    gate = threading.Event()

    def process(key, items):
        gate.wait(5)
        sizes.append(len(items))
        return [x * 10 for x in items]

    b = MicroBatcher(process, max_batch=32, max_wait_ms=200)
    try:
        requests = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([5, 30, 3, 40, 1])]
        futures = [b.submit("k", items) for items in requests]
        gate.set()
        for items, f in zip(requests, futures):
            assert f.result(5) == [x * 10 for x in items]
    finally:
        b.close()
    assert max(sizes) <= 32 and sum(sizes) == 79
    assert b.stats.largest <= 32 and b.stats.items == 79


def test_batcher_answers_requests_done_before_a_failing_batch():
    def process(key, items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    gate = threading.Event()
    b = MicroBatcher(lambda k, items: (gate.wait(5), process(k, items))[1], 16, 200)
    try:
        first = b.submit("k", list(range(20)))  # done with the second batch (items 16-31)
        second = b.submit("k", [*range(20), "bad"])  # its last item is in the third
        gate.set()
        assert first.result(5) == list(range(20))
        with pytest.raises(ValueError, match="boom"):
            second.result(5)
        assert b.submit("k", []).result(5) == []
    finally:
        b.close()


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


# ---------------------------------------------------------------------- API key

KEY = "k3y-for-tests"
CALLS = [
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("GET", "/openapi.json", None),
    ("POST", "/v1/classify", {"model": "alpha", "texts": TEXTS}),
    ("POST", "/v1/ner", {"model": "delta", "texts": NER_TEXTS}),
]


@pytest.fixture(scope="module")
def keyed_client(runs):
    settings = ServeSettings(max_texts=8, max_chars=200, api_key=KEY)
    with TestClient(create_app([runs["alpha"], runs["delta"]], settings)) as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
def test_without_a_key_every_endpoint_is_open(client, method, path, body):
    assert client.request(method, path, json=body).status_code == 200


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer  {KEY}"]
)
def test_with_a_key_a_missing_or_wrong_one_is_401(keyed_client, method, path, body, auth):
    headers = {"authorization": auth} if auth else {}
    r = keyed_client.request(method, path, json=body, headers=headers)
    assert r.status_code == 401
    message = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
    if path == "/v1/models":  # an OpenAI route: OpenAI's error shape
        assert r.json()["error"]["message"] == message
    else:
        assert r.json() == {"detail": message}
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_with_a_key_the_right_one_is_200(keyed_client, method, path, body, scheme):
    r = keyed_client.request(method, path, json=body, headers={"authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200, r.text


def test_key_is_checked_before_the_body(keyed_client):
    """A caller without the key learns nothing, not even the body limit (a 413)."""
    r = keyed_client.post("/v1/classify", content=b"x" * 10_000_000)
    assert r.status_code == 401


def test_key_stays_out_of_settings_repr():
    assert KEY not in repr(ServeSettings(api_key=KEY))


@pytest.mark.parametrize("key", ["", " padded", "new\nline", "naïve"])
def test_unusable_keys_are_refused(key):
    with pytest.raises(LmadaptError, match="--api-key"):
        ServeSettings(api_key=key)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost"])
def test_loopback_hosts_need_no_key(host):
    ServeSettings(host=host).check_exposure()


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", "::ffff:8.8.8.8", ""]
)
def test_other_hosts_need_a_key_or_allow_no_auth(host):
    with pytest.raises(LmadaptError, match="--allow-no-auth") as e:
        ServeSettings(host=host).check_exposure()
    assert "\n" not in str(e.value)
    ServeSettings(host=host, api_key=KEY).check_exposure()
    ServeSettings(host=host, allow_no_auth=True).check_exposure()


@pytest.fixture
def no_binding(monkeypatch):
    """uvicorn.run replaced by a recorder: these tests never open a socket."""
    import uvicorn

    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    monkeypatch.delenv("LMADAPT_API_KEY", raising=False)
    return started


def test_cli_refuses_a_public_host_without_a_key(runs, capsys, no_binding):
    assert main(["serve", runs["alpha"], "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmadapt: error: --host 0.0.0.0 is reachable from other machines")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not no_binding


def test_cli_takes_the_key_from_the_environment(runs, capsys, monkeypatch, no_binding):
    monkeypatch.setenv("LMADAPT_API_KEY", KEY)
    assert main(["serve", runs["alpha"], "--host", "0.0.0.0", "--port", "8123"]) == 0
    ((app, kw),) = no_binding
    assert kw["host"] == "0.0.0.0" and kw["port"] == 8123
    assert KEY not in capsys.readouterr().err
    with TestClient(app) as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_cli_serve_on_cuda_without_a_gpu_is_refused_before_loading(
    runs, capsys, monkeypatch, no_binding
):
    import torch

    from lmadapt.serve import app as serve_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(serve_app, "create_app", lambda *a: pytest.fail("loaded the runs"))
    assert main(["serve", runs["alpha"], "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "Traceback" not in err
    assert not no_binding


def test_cli_serve_on_the_cpu_serves_todays_predictions(runs, expected, no_binding):
    assert main(["serve", runs["alpha"], "--device", "cpu"]) == 0
    ((app, _),) = no_binding
    with TestClient(app, base_url="http://localhost") as c:  # no key: the Host is checked
        r = c.post("/v1/classify", json={"model": "alpha", "texts": TEXTS})
    assert r.status_code == 200 and r.json()["results"] == expected["alpha"]


def test_cli_serve_help_lists_every_endpoint(client):
    from lmadapt.cli import COMMANDS

    help_text = COMMANDS["serve"][0]
    paths = list(client.get("/openapi.json").json()["paths"])
    assert len(paths) == 9
    for path in paths:
        assert path in help_text
