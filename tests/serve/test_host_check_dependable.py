"""Issue 29, item 5: `lmadapt serve` without an API key answers only requests whose Host header
names this server (loopback, --host, --allowed-host), so a web page that rebinds its own name
to 127.0.0.1 cannot read answers nor spend the server's CPU. With a key, the key decides."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmadapt.api import train  # noqa: E402
from lmadapt.cli import main  # noqa: E402
from lmadapt.config import build_run_config  # noqa: E402
from lmadapt.errors import ConfigError  # noqa: E402
from lmadapt.serve.guards import HostCheck  # noqa: E402
from lmadapt.serve.settings import ServeSettings, host_name  # noqa: E402
from tests.conftest import sentiment_rows, write_csv  # noqa: E402

KEY = "k" * 32


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8000", "localhost"),
        ("localhost.", "localhost"),
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("::1", "::1"),
        ("runs.example.com:443", "runs.example.com"),
        ("evil@localhost", None),
        ("localhost/x", None),
        ("localhost:port", None),
        ("localhost:123456", None),
        ("[::1", None),
        ("", None),
        ("local host", None),
        ("http://localhost", None),
    ],
)
def test_host_name_parses_what_a_host_header_may_hold(value, name):
    assert host_name(value) == name


def test_host_names_are_loopback_the_bound_host_and_the_allowed_ones():
    assert ServeSettings().host_names == {"localhost", "127.0.0.1", "::1"}
    s = ServeSettings(host="0.0.0.0", allowed_hosts=["Models.Example.com", "[fd00::1]:8000"])
    assert s.host_names == {
        "localhost",
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "models.example.com",
        "fd00::1",
    }
    with pytest.raises(ConfigError, match="--allowed-host"):
        ServeSettings(allowed_hosts=["https://models.example.com/"])


def _call(app: Any, scope_type: str, headers: list[tuple[bytes, bytes]]) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": scope_type, "path": "/", "headers": headers, "method": "GET"}
    asyncio.run(app(scope, receive, send))
    return sent


def test_host_check_refuses_a_missing_host_and_closes_foreign_websockets():
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    checked = HostCheck(inner, {"localhost"})
    assert _call(checked, "http", [(b"host", b"localhost:1")])[0]["status"] == 200
    assert _call(checked, "http", [])[0]["status"] == 400
    assert _call(checked, "http", [(b"host", b"\xff\xfe")])[0]["status"] == 400
    assert _call(checked, "websocket", [(b"host", b"evil.example")]) == [
        {"type": "websocket.close", "code": 1008}
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_bert) -> str:
    root = tmp_path_factory.mktemp("hosts")
    data = write_csv(root / "train.csv", sentiment_rows(16, seed=1))
    cfg = {
        "model": tiny_bert,
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": {"train": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32", "threads": 1},
        "output_dir": str(root / "alpha"),
    }
    return train(build_run_config(cfg))["run_dir"]


@pytest.fixture
def started(monkeypatch) -> list:
    """uvicorn.run replaced by a recorder: these tests never open a socket."""
    import uvicorn

    apps: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.delenv("LMADAPT_API_KEY", raising=False)
    return apps


BODY = {"texts": ["the film was good"]}


def test_serve_without_a_key_answers_only_its_own_names(run_dir, started, capsys):
    assert main(["serve", run_dir, "--device", "cpu", "--allowed-host", "models.example.com"]) == 0
    (app,) = started
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/health").status_code == 200
        for host in ("127.0.0.1:8000", "[::1]:8000", "models.example.com"):
            assert c.post("/v1/classify", json=BODY, headers={"host": host}).status_code == 200
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):
            r = c.post("/v1/classify", json=BODY, headers={"host": host})
            assert r.status_code == 400 and "--allowed-host" in r.json()["detail"]
            r = c.get("/v1/models", headers={"host": host})  # an OpenAI route: its error shape
            assert r.status_code == 400 and "--allowed-host" in r.json()["error"]["message"]


def test_serve_with_a_key_leaves_the_host_to_the_key(run_dir, started, monkeypatch):
    monkeypatch.setenv("LMADAPT_API_KEY", KEY)
    assert main(["serve", run_dir, "--device", "cpu"]) == 0
    (app,) = started
    auth = {"authorization": f"Bearer {KEY}", "host": "models.example.com"}
    with TestClient(app) as c:
        assert c.post("/v1/classify", json=BODY, headers=auth).status_code == 200
        assert c.get("/health", headers={"host": "localhost"}).status_code == 401


def test_cli_serve_refuses_a_bad_allowed_host_in_one_line(run_dir, started, capsys):
    assert main(["serve", run_dir, "--allowed-host", "a b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allowed-host" in err and "Traceback" not in err
    assert not started
