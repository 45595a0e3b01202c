"""Generation over HTTP: /v1/generate and /v1/chat/completions (plain and SSE) answer what the
generation task itself decodes, per adapter on a shared base, and refuse bad requests with 4xx."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmadapt.api import train  # noqa: E402
from lmadapt.config import build_run_config  # noqa: E402
from lmadapt.data.chat import Conversation  # noqa: E402
from lmadapt.generate import Generator, generate, load_generator  # noqa: E402
from lmadapt.inference import cut_at_stops  # noqa: E402
from lmadapt.serve.app import create_app  # noqa: E402
from lmadapt.serve.settings import ServeSettings  # noqa: E402
from lmadapt.serve.streaming import StopCutter  # noqa: E402

TRAIN = {"epochs": 1, "batch_size": 4, "precision": "fp32", "threads": 1}
SETTINGS = ServeSettings(max_wait_ms=5, max_texts=4, max_chars=400, max_new_tokens=16)
PROMPT = "what is two plus two?"
CHAT = [
    {"role": "system", "content": "answer briefly"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": PROMPT},
]


def _train_generation(
    root: Path, tiny_llama: str, name: str, seed: int, method: str = "lora"
) -> str:
    """A chat run (LoRA by default) on 8 alpaca rows; a high learning rate so sibling adapters
    differ."""
    rows = [
        {"instruction": f"what is {i} plus {i}?", "input": "", "output": f"{name} {2 * i}"}
        for i in range(8)
    ]
    data = root / f"{name}.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    cfg = {
        "model": tiny_llama,
        "task": {"type": "generation", "max_length": 48, "max_new_tokens": 8},
        "method": {"name": method},
        "data": {"train": str(data)},
        "train": {**TRAIN, "lr": 0.05, "seed": seed},
        "output_dir": str(root / name),
    }
    return train(build_run_config(cfg))["run_dir"]


def _train_classifier(root: Path, tiny_bert: str) -> str:
    rng = random.Random(0)
    lines = ["text,label"] + [
        f"the film was {rng.choice(['good', 'bad'])},{'pos' if i % 2 else 'neg'}" for i in range(8)
    ]
    data = root / "clf.csv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "bitfit"},
        "data": {"train": str(data)},
        "train": TRAIN,
        "output_dir": str(root / "clf"),
    }
    return train(build_run_config(cfg))["run_dir"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_bert) -> dict[str, str]:
    """echo and parrot: LoRA generation adapters on one tiny Llama; clf: a classifier."""
    root = tmp_path_factory.mktemp("serve-generation")
    return {
        "echo": _train_generation(root, tiny_llama, "echo", 1),
        "parrot": _train_generation(root, tiny_llama, "parrot", 2),
        "clf": _train_classifier(root, tiny_bert),
    }


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(list(runs.values()), SETTINGS)) as c:
        yield c


@pytest.fixture(scope="module")
def gens(runs) -> dict[str, Generator]:
    """Each generation run loaded on its own, as `lmadapt generate` loads it: the reference."""
    return {name: load_generator(runs[name]) for name in ("echo", "parrot")}


def _chat(gen: Generator, messages: list[dict], **settings) -> str:
    (text,) = gen.generate([Conversation(messages)], gen.task.settings(**settings))
    return text


def _post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _message(r) -> str:
    """A refusal's message: OpenAI's error shape on its routes, `detail` on lmadapt's own."""
    body = r.json()
    return body["error"]["message"] if r.url.path == "/v1/chat/completions" else body["detail"]


def _events(client, body: dict) -> tuple[list[dict], list[str]]:
    """The JSON chunks of a streamed chat completion, and every raw `data:` payload."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    assert raw.endswith("\n\n")
    payloads = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in raw.split("\n\n") if e)
    return [json.loads(p) for p in payloads if p != "[DONE]"], payloads


# ---------------------------------------------------------------------- /v1/generate


def test_models_list_generation_runs_sharing_one_base(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["echo"]["task"] == cards["parrot"]["task"] == "generation"
    assert cards["echo"]["shares_base_with"] == ["parrot"]
    assert cards["clf"]["task"] == "classification"
    assert client.get("/health").json()["base_models_in_memory"] == 2


def test_other_methods_share_the_base_and_generate_as_alone(runs, tiny_llama, tmp_path, gens):
    """An IA3 run beside a LoRA one on the same Llama: peft keeps them in two models, over one
    copy of the base weights; each generates exactly what it generates loaded alone."""
    ia3 = _train_generation(tmp_path, tiny_llama, "scaled", 3, method="ia3")
    app = create_app([runs["echo"], ia3, runs["clf"]], SETTINGS)
    alone = {"echo": gens["echo"], "scaled": load_generator(ia3)}
    want = {name: generate(g, [PROMPT], {"max_new_tokens": 8}) for name, g in alone.items()}
    assert want["echo"] != want["scaled"]
    with TestClient(app) as c:
        assert c.get("/health").json()["base_models_in_memory"] == 2
        cards = {card["id"]: card for card in c.get("/v1/models").json()["data"]}
        assert cards["scaled"]["shares_base_with"] == ["echo"]
        assert cards["clf"]["shares_base_with"] == []
        for name in alone:
            body = {"model": name, "prompt": PROMPT, "max_new_tokens": 8}
            texts = [r["text"] for r in _post(c, "/v1/generate", body)["results"]]
            assert texts == want[name], name


def test_generation_forward_passes_hold_at_most_max_batch_prompts(runs):
    """Four prompts with max_batch 2: two decodes of two (the task alone would decode all four
    in one batch of its generate_batch_size, 16)."""
    settings = ServeSettings(max_batch=2, max_texts=4, max_chars=400, max_new_tokens=16)
    app = create_app([runs["echo"]], settings)
    rows: list[int] = []
    (group,) = app.state.server.groups
    group.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(out.shape[0])
    )
    prompts = ["hi", PROMPT, "the cat sat", "two plus two"]
    with TestClient(app) as c:
        out = _post(c, "/v1/generate", {"model": "echo", "prompts": prompts, "max_new_tokens": 4})
    assert len(out["results"]) == 4
    assert rows and max(rows) == 2


def test_generate_greedy_equals_the_task_per_adapter(client, gens):
    want = {name: generate(g, [PROMPT], {"max_new_tokens": 8}) for name, g in gens.items()}
    assert want["echo"] != want["parrot"]  # else routing to the wrong adapter would go unseen
    for name, g in gens.items():
        body = {"model": name, "prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
        out = _post(client, "/v1/generate", body)
        (result,) = out["results"]
        assert out["model"] == name and [result["text"]] == want[name]
        conv = Conversation([{"role": "user", "content": PROMPT}])
        (feat,) = g.task.encode([conv], g.task.tokenizer)
        assert result["prompt_tokens"] == len(feat["input_ids"])
        assert out["usage"]["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]


def test_generate_respects_max_new_tokens(client, gens):
    prompts = ["hi", "the cat sat on the mat and then"]
    out = _post(client, "/v1/generate", {"model": "echo", "prompts": prompts, "max_new_tokens": 3})
    assert [r["text"] for r in out["results"]] == generate(
        gens["echo"], prompts, {"max_new_tokens": 3}
    )
    for r in out["results"]:
        assert r["completion_tokens"] <= 3
        assert (r["finish_reason"] == "length") == (r["completion_tokens"] == 3)
    assert any(r["finish_reason"] == "length" for r in out["results"])


def test_generate_cuts_at_stop_strings(client, gens):
    (full,) = generate(gens["parrot"], [PROMPT], {"max_new_tokens": 8})
    stop = full[len(full) // 2 :][:2]
    assert stop.strip(), full
    body = {"model": "parrot", "prompt": PROMPT, "max_new_tokens": 8, "stop": [stop]}
    (result,) = _post(client, "/v1/generate", body)["results"]
    assert result["text"] == full[: full.index(stop)].strip()
    assert result["finish_reason"] == "stop"
    assert [result["text"]] == generate(
        gens["parrot"], [PROMPT], {"max_new_tokens": 8, "stop": [stop]}
    )


def test_sampling_is_seeded_like_the_task(client, gens):
    body = {"model": "echo", "prompt": PROMPT, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = _post(client, "/v1/generate", body)["results"][0]["text"]
    assert _post(client, "/v1/generate", body)["results"][0]["text"] == first
    settings = {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    assert [first] == generate(gens["echo"], [PROMPT], settings)


def test_concurrent_requests_route_to_their_adapter(client, gens):
    want = {name: generate(g, [PROMPT], {"max_new_tokens": 8}) for name, g in gens.items()}

    def call(name: str) -> tuple[str, list[str]]:
        body = {"model": name, "prompt": PROMPT, "max_new_tokens": 8}
        return name, [r["text"] for r in _post(client, "/v1/generate", body)["results"]]

    with ThreadPoolExecutor(4) as pool:
        for name, texts in pool.map(call, ["echo", "parrot"] * 4):
            assert texts == want[name]


# ---------------------------------------------------------------------- /v1/chat/completions


def test_chat_completion_is_openai_shaped(client, gens):
    body = {"model": "echo", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    out = _post(client, "/v1/chat/completions", body)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "echo" and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"] == {
        "role": "assistant",
        "content": _chat(gens["echo"], CHAT, max_new_tokens=8),
    }
    usage = out["usage"]
    assert usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def _content(client, body: dict) -> str:
    return _post(client, "/v1/chat/completions", body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("case", ["greedy", "stop", "sampled"])
def test_chat_stream_concatenates_to_the_plain_answer(client, case):
    body = {"model": "parrot", "messages": CHAT, "max_tokens": 12, "temperature": 0}
    if case == "stop":  # a stop string from inside the plain answer, so the cut is exercised
        plain = _content(client, body)
        body["stop"] = plain[len(plain) // 2 :][:2]
    if case == "sampled":  # a seeded text with an inner space: the streamer sends it in pieces
        body["temperature"] = 1.0
        body["seed"] = next(s for s in range(50) if " " in _content(client, {**body, "seed": s}))
    plain = _post(client, "/v1/chat/completions", body)["choices"][0]
    chunks, payloads = _events(client, body)
    assert payloads[-1] == "[DONE]"
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert all(set(d) == {"content"} and d["content"] for d in deltas)
    assert "".join(d["content"] for d in deltas) == plain["message"]["content"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": plain["finish_reason"],
    }
    if case == "stop":
        assert plain["finish_reason"] == "stop"
    if case == "sampled":
        assert len(deltas) > 1


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("  hello world  ", []),
        ("say ab then abc", ["abc"]),
        ("x\n\ny", ["\n\n"]),
        ("\n\nlead", ["\n\n"]),
        ("no stop here a", ["ab", "zz"]),
    ],
)
def test_stop_cutter_equals_the_task_cut_for_any_split(text, stops):
    want = cut_at_stops(text, stops)
    for size in (1, 2, 3, len(text)):
        cutter = StopCutter(stops)
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        got = "".join(cutter.feed(p) for p in pieces) + cutter.feed("", final=True)
        assert got == want


# ---------------------------------------------------------------------- refusals

LONG_PROMPT = " ".join(["the cat sat on the mat"] * 12)  # < max_chars, > task.max_length tokens


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/generate", {"prompt": "x", "max_new_tokens": 17}, 413, "max_new_tokens=17 exceeds"),
        (
            "/v1/chat/completions",
            {"max_tokens": 99},
            413,
            "max_tokens=99 exceeds the server limit 16",
        ),
        ("/v1/generate", {"prompt": LONG_PROMPT}, 413, "prompt is too long: 48 tokens or more"),
        ("/v1/generate", {"prompts": ["hi", LONG_PROMPT]}, 413, "prompts[1] is too long"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": LONG_PROMPT}]},
            413,
            "task.max_length is 48",
        ),
        ("/v1/generate", {"prompt": "y" * 401}, 413, "prompt[0] has 401 characters"),
        ("/v1/generate", {"prompts": ["a"] * 5}, 413, "5 prompts in one request; the limit is 4"),
        ("/v1/generate", {"prompt": " "}, 422, "prompt[0] is empty"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            422,
            "messages[1].role: expected assistant, got user",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            422,
            "the last message must be a user turn",
        ),
    ],
)
def test_limits_are_4xx_with_a_message(client, path, body, status, message):
    if path.endswith("completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], **body}
    r = client.post(path, json={"model": "echo", **body})
    assert r.status_code == status, r.text
    assert message in _message(r)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model": "echo"}',
        b'{"model": "echo", "prompt": "a", "prompts": ["b"]}',
        b'{"model": "echo", "prompts": []}',
        b'{"model": "echo", "prompt": "a", "temperature": -1}',
        b'{"model": "echo", "prompt": "a", "top_p": 0}',
        b'{"model": "echo", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}',
        b'{"model": "echo", "prompt": "a", "stop": [""]}',
        b'{"model": "echo", "prompt": "a", "max_new_tokens": 0}',
        b'{"model": "echo", "prompt": "a", "seed": -1}',
        b'{"model": "echo", "prompt": "a", "typo": 1}',
    ],
)
def test_malformed_generate_body_is_422(client, body):
    r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model": "echo", "messages": []}',
        b'{"model": "echo", "messages": [{"role": "tool", "content": "x"}]}',
        b'{"model": "echo", "messages": [{"role": "user"}]}',
        b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "maybe"}',
    ],
)
def test_malformed_chat_body_is_422(client, body):
    r = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_listing_names(client, stream):
    msgs = [{"role": "user", "content": "hi"}]
    for path, body in [
        ("/v1/generate", {"model": "../echo", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "nope", "messages": msgs, "stream": stream}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 404
        assert "served models: clf, echo, parrot" in _message(r)


@pytest.mark.parametrize("stream", [False, True])
def test_generation_on_a_classifier_is_400(client, stream):
    r = client.post("/v1/generate", json={"model": "clf", "prompt": "hi"})
    assert r.status_code == 400
    assert r.json()["detail"] == (
        "model 'clf' is a classification model; /v1/generate needs a generation or preference model"
    )
    msgs = [{"role": "user", "content": "hi"}]
    body = {"model": "clf", "messages": msgs, "stream": stream}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "needs a generation or preference model" in _message(r)
    r = client.post("/v1/classify", json={"model": "echo", "texts": ["hi"]})
    assert r.status_code == 400 and "is a generation model" in r.json()["detail"]


# ---------------------------------------------------------------------- API key

KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def keyed_client(runs):
    with TestClient(create_app([runs["echo"]], ServeSettings(api_key=KEY))) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 2}),
        ("/v1/chat/completions", {"model": "echo", "messages": CHAT, "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": CHAT, "max_tokens": 2, "stream": True},
        ),
    ],
)
def test_api_key_guards_generation_endpoints(keyed_client, path, body):
    for headers in ({}, {"authorization": "Bearer nope"}):
        r = keyed_client.post(path, json=body, headers=headers)
        assert r.status_code == 401 and "API key" in _message(r)
    r = keyed_client.post(path, json=body, headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    if body.get("stream"):
        assert r.text.endswith("data: [DONE]\n\n")
