"""POST /v1/explain answers what `lmadapt.api.explain` computes, with the request checks."""

from __future__ import annotations

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmadapt.api import explain, load_run  # noqa: E402
from lmadapt.serve.app import create_app  # noqa: E402
from lmadapt.serve.settings import ServeSettings  # noqa: E402
from tests.evaluate.test_explain import _train  # noqa: E402

TEXTS = ["a great film", "the plot was bad"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert):
    run_dir = _train(tmp_path_factory.mktemp("explain-serve"), tiny_bert, {"name": "lora"}, 1e-2, 1)
    with TestClient(create_app([run_dir], ServeSettings(max_texts=4, max_chars=100))) as client:
        yield client, run_dir


def test_explain_returns_the_apis_attributions(served):
    client, run_dir = served
    r = client.post("/v1/explain", json={"texts": TEXTS, "steps": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    want = explain(load_run(run_dir, "cpu"), TEXTS, steps=8)
    assert body["model"] == "run" and len(body["results"]) == len(want)
    for got, exp in zip(body["results"], want):
        (g,), (e,) = got["explanations"], exp["explanations"]
        assert got["text"] == exp["text"] and g["label"] == e["label"]
        assert [w["word"] for w in g["words"]] == [w["word"] for w in e["words"]]
        assert [w["score"] for w in g["words"]] == pytest.approx(
            [w["score"] for w in e["words"]], abs=1e-4
        )
    r = client.post("/v1/explain", json={"texts": TEXTS[:1], "method": "occlusion"})
    assert r.status_code == 200 and r.json()["results"][0]["method"] == "occlusion"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"texts": ["good"], "label": "maybe"}, 400, "unknown label"),
        ({"texts": ["good"], "steps": 0}, 422, "steps"),
        ({"texts": ["good"], "steps": 10_000}, 422, "steps"),
        ({"texts": ["good"], "method": "shap"}, 422, "method"),
        ({"texts": ["good"] * 5}, 413, "limit is 4"),
        ({"texts": [""]}, 422, "empty"),
    ],
)
def test_explain_refuses_bad_requests(served, body, status, message):
    r = served[0].post("/v1/explain", json=body)
    assert r.status_code == status and message in r.text, r.text
