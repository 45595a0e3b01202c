"""`lmadapt serve EXPORT_DIR`: an ONNX export answers at the run's endpoints as the run does
(same labels, tags and answers; scores within the export's tolerance), behind the same guards."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from lmadapt.export_onnx import ONNX_TOLERANCE  # noqa: E402
from lmadapt.serve.app import create_app  # noqa: E402
from lmadapt.serve.settings import ServeSettings  # noqa: E402
from tests.onnx_runs import TEXTS  # noqa: E402

ENDPOINTS = {"classification": "classify", "token_classification": "ner"}


def _body(kind: str, name: str) -> tuple[str, dict]:
    """The endpoint and request body asking `name` about the kind's probe texts."""
    if kind == "question_answering":
        return "qa", {"model": name, "items": [json.loads(t) for t in TEXTS[kind]]}
    return ENDPOINTS[kind], {"model": name, "texts": TEXTS[kind]}


def _close(a: object, b: object) -> None:
    """Equal rows, numbers within the export's tolerance (probabilities, scores)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=10 * ONNX_TOLERANCE)
    else:
        assert a == b


@pytest.fixture(scope="module")
def served(onnx_runs, onnx_fp32, tmp_path_factory) -> dict[str, str]:
    """Every run beside its export, under names that tell them apart."""
    root = tmp_path_factory.mktemp("served")
    names = {}
    for kind, run in onnx_runs.items():
        names[f"{kind}-run"] = shutil.copytree(run, root / f"{kind}-run")
        names[f"{kind}-onnx"] = shutil.copytree(onnx_fp32[kind][1], root / f"{kind}-onnx")
    return {k: str(v) for k, v in names.items()}


@pytest.mark.parametrize("kind", list(TEXTS))
def test_an_export_answers_as_its_run(kind, served):
    key = "a-key"
    with TestClient(create_app(list(served.values()), ServeSettings(api_key=key))) as c:
        auth = {"Authorization": f"Bearer {key}"}
        endpoint, body = _body(kind, f"{kind}-onnx")
        assert c.post(f"/v1/{endpoint}", json=body).status_code == 401  # the same guards
        got = c.post(f"/v1/{endpoint}", json=body, headers=auth)
        assert got.status_code == 200, got.text
        expected = c.post(f"/v1/{endpoint}", json={**body, "model": f"{kind}-run"}, headers=auth)
        _close(got.json()["results"], expected.json()["results"])
        card = c.get(f"/v1/models/{kind}-onnx", headers=auth).json()
        run_card = c.get(f"/v1/models/{kind}-run", headers=auth).json()
        assert card["engine"] == "onnxruntime" and run_card["engine"] == "pytorch"
        assert {k: card[k] for k in ("task", "method", "base_model", "labels")} == {
            k: run_card[k] for k in ("task", "method", "base_model", "labels")
        }
        assert card["shares_base_with"] == []  # a graph holds its own weights


def test_concurrent_requests_to_an_export_are_batched_and_answered_alone(served):
    """Micro-batching: requests in flight together share forward passes, and each answer is
    the one that text gets alone."""
    name, texts = "classification-onnx", TEXTS["classification"] * 8
    with TestClient(create_app([served[name]], ServeSettings(max_wait_ms=50))) as c:
        alone = {t: c.post("/v1/classify", json={"texts": [t]}).json()["results"][0] for t in texts}
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = list(
                pool.map(lambda t: c.post("/v1/classify", json={"texts": [t]}).json(), texts)
            )
        for t, a in zip(texts, answers):
            _close(a["results"][0], alone[t])
        health = c.get("/health").json()
        assert health["largest_batch"] > 1
        # limits hold as for any run
        long = c.post("/v1/classify", json={"texts": ["x" * 10_001]})
        assert long.status_code == 413 and "limit is 10000" in long.json()["detail"]


def test_explaining_an_export_is_refused_by_name(served):
    with TestClient(create_app([served["classification-onnx"]])) as c:
        r = c.post("/v1/explain", json={"texts": TEXTS["classification"][:1]})
        assert r.status_code == 400
        assert "served by onnxruntime, which computes no gradients" in r.json()["detail"]


def test_an_incomplete_export_is_refused_naming_what_is_missing(served, tmp_path):
    broken = shutil.copytree(served["classification-onnx"], tmp_path / "broken")
    (broken / "config.yaml").unlink()
    with pytest.raises(Exception, match=r"not a complete ONNX export \(no config.yaml\)"):
        create_app([str(broken)])
