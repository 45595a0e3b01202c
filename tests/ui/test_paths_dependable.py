"""Issue 29, items 4, 5, 11, 17: what the dashboard opens goes through `lmadapt.paths` (links
out of the run, FIFOs, NUL bytes and over-long names are refused, never served, never a 500 or
a hung worker), a foreign Host header or an oversized body is refused, and a huge log.jsonl is
thinned to bounded curves. The runs here are written by hand: no training needed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lmadapt import paths
from lmadapt.cli import main
from lmadapt.paths import RefusedPath, inside, open_inside
from lmadapt.serve.settings import ServeSettings
from lmadapt.ui import runs
from lmadapt.ui.app import UI_BODY_BYTES, create_ui_app

SECRET = "TOP-SECRET-42"
LONG = "a" * 300
CONFIG = "model: tiny\ntask:\n  type: classification\nmethod:\n  name: lora\ntrain:\n  metric: f1\n"


def _finishes(call: Callable[[], Any], fifos: list[Path], timeout: float = 20) -> Any:
    """call() in a thread; fails (after unblocking it by writing to `fifos`) if it is still
    waiting after `timeout` seconds, as opening a FIFO for reading does."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = call()
        except BaseException as e:  # handed to the test below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for _ in range(100):  # unblocked, the call may go on to open the next FIFO
            for fifo in fifos:
                with contextlib.suppress(OSError):  # ENXIO: nobody is reading this one
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            t.join(0.1)
        pytest.fail("hung on a FIFO")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _run(root: Path, name: str, steps: int = 3) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(CONFIG)
    (d / "metrics.json").write_text(json.dumps({"dev": {"f1": 0.5}}))
    (d / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, steps + 1))
    )
    (d / "report.md").write_text("# report\n\nall fine\n")
    return d


@pytest.fixture
def root(tmp_path) -> Path:
    """ok/ (a plain run); linked/ (each file a link to a secret outside the root); fifo/ (each
    file a FIFO); inner/ (links that stay inside its own run)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(f"# {SECRET}\n")
    (outside / "secret.yaml").write_text(f"model: {SECRET}\ntask:\n  type: {SECRET}\n")
    (outside / "secret.json").write_text(json.dumps({"dev": {"f1": 0.99, SECRET: 1}}))
    (outside / "secret.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, SECRET: 1}) + "\n")
    (outside / "secret.png").write_bytes(b"\x89PNG" + SECRET.encode())
    base = tmp_path / "runs"
    _run(base, "ok")
    linked = _run(base, "linked")
    for name, target in (
        ("report.md", "secret.md"),
        ("config.yaml", "secret.yaml"),
        ("metrics.json", "secret.json"),
        ("log.jsonl", "secret.jsonl"),
        ("plot.png", "secret.png"),
    ):
        (linked / name).unlink(missing_ok=True)
        (linked / name).symlink_to(outside / target)
    fifo = _run(base, "fifo")
    for name in ("report.md", "metrics.json", "log.jsonl", "plot.png"):
        (fifo / name).unlink(missing_ok=True)
        os.mkfifo(fifo / name)
    inner = _run(base, "inner")
    (inner / "real.png").write_bytes(b"\x89PNG-inner")
    (inner / "plots").mkdir()
    (inner / "plots" / "link.png").symlink_to(inner / "real.png")
    return base


@pytest.fixture
def client(root):
    with TestClient(create_ui_app(root), base_url="http://localhost") as c:
        yield c


def _fifos(root: Path) -> list[Path]:
    return [p for p in (root / "fifo").iterdir() if p.is_fifo()]


# ---------------------------------------------------------------------- the one function


def test_inside_returns_resolved_regular_files_and_directories(root):
    run = root / "inner"
    assert inside(root, "inner", kind="dir") == run.resolve()
    assert inside(root, ".", kind="dir") == root.resolve()
    assert inside(run, "plots/link.png") == (run / "real.png").resolve()  # a link inside
    with open_inside(run, "plots", "link.png") as f:
        assert f.read() == b"\x89PNG-inner" and f.name == str((run / "real.png").resolve())


@pytest.mark.parametrize(
    ("parts", "kind", "why"),
    [
        (("linked", "report.md"), "file", "leads outside the root"),
        (("..", "outside", "secret.md"), "file", "leads outside the root"),
        (("fifo", "report.md"), "file", "not a regular file"),
        (("ok",), "file", "not a regular file"),
        (("ok", "report.md"), "dir", "not a directory"),
        (("ok", "report\x00.md"), "file", "holds a NUL byte"),
        (("ok", LONG), "file", "file name too long"),
        (("ok", "loop"), "file", "symlink loop"),
        (("ok", "gone.md"), "file", "no such file or directory"),
        (("ok", "dangling.md"), "file", "no such file or directory"),
        (("/dev/null",), "file", "leads outside the root"),
    ],
)
def test_inside_refuses_links_out_fifos_nul_and_long_names(root, parts, kind, why):
    (root / "ok" / "loop").symlink_to(root / "ok" / "loop")
    (root / "ok" / "dangling.md").symlink_to(root / "nowhere")
    if kind == "file":
        call = lambda: open_inside(root, *parts)  # noqa: E731
    else:
        call = lambda: inside(root, *parts, kind="dir")  # noqa: E731
    with pytest.raises(RefusedPath) as e:
        _finishes(call, _fifos(root))
    assert why in str(e.value)
    assert len(str(e.value)) < 200  # a long name is quoted short


def test_open_inside_refuses_a_fifo_or_link_swapped_in_after_the_check(root, monkeypatch):
    """Between `inside` and the open, the file may change: the open itself must not block on a
    FIFO nor follow a link."""
    fifo = root / "fifo" / "report.md"
    link = root / "linked" / "report.md"
    for swapped in (fifo, link):
        monkeypatch.setattr(paths, "inside", lambda *a, s=swapped, **k: s)
        with pytest.raises(RefusedPath):
            _finishes(lambda: open_inside(root, "x"), _fifos(root))


# ---------------------------------------------------------------------- item 4: links out


def test_links_out_of_a_run_are_never_served(client):
    rows = client.get("/api/runs")
    assert rows.status_code == 200 and SECRET not in rows.text
    (row,) = [r for r in rows.json() if r["id"] == "linked"]
    assert row["status"] == "bad" and "leads outside the root" in row["problems"][0]
    r = client.get("/api/run", params={"id": "linked"})
    assert r.status_code == 200 and SECRET not in r.text
    problems = " ".join(r.json()["summary"]["problems"])
    for part in ("report", "config", "curves", "metrics"):
        assert f"{part}: RefusedPath:" in problems
    assert client.get("/api/file", params={"id": "linked", "name": "plot.png"}).status_code == 404
    (progress,) = client.get("/api/progress", params={"id": "linked"}).json()
    assert SECRET not in json.dumps(progress)


def test_links_inside_the_run_still_serve(client):
    r = client.get("/api/file", params={"id": "inner", "name": "plots/link.png"})
    assert r.status_code == 200 and r.content == b"\x89PNG-inner"
    assert r.headers["content-type"] == "image/png"
    d = client.get("/api/run", params={"id": "ok"}).json()
    assert d["summary"]["problems"] == [] and "all fine" in d["report_html"]


# ---------------------------------------------------------------------- item 17: FIFOs, big logs


def test_a_fifo_in_a_run_never_hangs_a_request(client, root):
    for url, params in (
        ("/api/run", {"id": "fifo"}),
        ("/api/runs", {}),
        ("/api/progress", {"id": "fifo"}),
        ("/api/file", {"id": "fifo", "name": "plot.png"}),
    ):
        r = _finishes(lambda u=url, p=params: client.get(u, params=p), _fifos(root))
        assert r.status_code in (200, 404), (url, r.status_code)
    d = client.get("/api/run", params={"id": "fifo"}).json()
    assert "report: RefusedPath: 'report.md': not a regular file" in d["summary"]["problems"]


def test_a_huge_log_gives_bounded_curves_read_a_line_at_a_time(tmp_path):
    steps = 3 * runs.MAX_POINTS + 7
    run = _run(tmp_path / "runs", "long", steps=0)
    with open(run / "log.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 1 / s, "lr": 0.1}) + "\n")
            if s % 500 == 0:
                f.write(json.dumps({"step": s, "dev": {"f1": s / steps}}) + "\n")
        f.write("x" * (runs.MAX_LINE_BYTES + 10) + "\n")  # skipped, not held
        f.write('{"step": 1, "lo')  # a line being written
    c = runs.curves(run)
    assert c["unreadable_lines"] == 2
    for key in ("loss", "lr"):
        x, y = c["train"][key]
        assert len(x) == len(y) <= runs.MAX_POINTS
        assert x[0] == 1 and x[-1] == steps and x == sorted(x)  # first and last kept
    assert c["train"]["loss"][1][-1] == pytest.approx(1 / steps)
    assert c["dev"]["f1"][0] == list(range(500, steps + 1, 500))  # few points: all kept


def test_a_huge_log_is_never_held_whole(tmp_path):
    """curves() keeps the points it sends, not the file nor its records: its peak allocation
    stays well under the log's size."""
    import tracemalloc

    run = _run(tmp_path / "runs", "long", steps=100_000)
    size = (run / "log.jsonl").stat().st_size
    tracemalloc.start()
    try:
        c = runs.curves(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(c["train"]["loss"][0]) <= runs.MAX_POINTS
    assert peak < size / 4, (peak, size)


# ---------------------------------------------------------------------- item 11: 500s


@pytest.mark.parametrize("entry", ["ok\x00", "a\x00b", LONG, f"ok/{LONG}", "\x00" * 3])
def test_nul_and_long_run_ids_are_404_everywhere(client, entry):
    for url in ("/api/run", "/run", "/api/progress", "/compare", "/api/file"):
        r = client.get(url, params={"id": entry, "name": "plot.png"})
        assert r.status_code == 404, (url, r.status_code)
    assert client.post("/api/playground", json={"id": entry}).status_code == 404


@pytest.mark.parametrize("name", ["a\x00.png", LONG + ".png", f"{LONG}/x.png", "\x00"])
def test_nul_and_long_file_names_are_404(client, name):
    assert client.get("/api/file", params={"id": "ok", "name": name}).status_code == 404


def test_a_body_over_the_limit_is_413_before_it_is_read(client, root):
    big = {"content-length": str(100 * 2**20), "content-type": "application/json"}
    r = client.post("/api/playground", content=b'{"id": "ok"}', headers=big)
    assert r.status_code == 413 and str(UI_BODY_BYTES) in r.text

    pulled: list[int] = []

    async def receive() -> dict[str, Any]:
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 2**20, "more_body": len(pulled) < 100}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/playground",
        "raw_path": b"/api/playground",
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8765),
        "headers": [(b"host", b"localhost:8765"), (b"content-type", b"application/json")],
    }
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 413 and len(pulled) == 1  # 1 MiB read of 100


def test_a_bad_body_is_422_without_being_echoed(client):
    r = client.post("/api/playground", json={"id": ["Z" * 30_000]})
    assert r.status_code == 422 and "ZZZZ" not in r.text and len(r.text) < 1000


def test_the_playground_loads_only_runs_whose_files_stay_inside(client, root, tmp_path):
    model = root / "ok" / "model"
    model.mkdir()
    (model / "adapter_model.safetensors").symlink_to(tmp_path / "outside" / "secret.md")
    r = client.post("/api/playground", json={"id": "ok"})
    assert r.status_code == 400 and "ok/model/adapter_model.safetensors" in r.text
    assert "leads outside the root" in r.text and SECRET not in r.text
    (model / "adapter_model.safetensors").unlink()
    (root / "ok" / "run.json").unlink(missing_ok=True)
    os.mkfifo(root / "ok" / "run.json")
    fifos = [root / "ok" / "run.json"]
    r = _finishes(lambda: client.post("/api/playground", json={"id": "ok"}), fifos)
    assert r.status_code == 400 and "not a regular file" in r.text


# ---------------------------------------------------------------------- item 5: Host header


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost:8765", 200),
        ("LOCALHOST", 200),
        ("127.0.0.1:8765", 200),
        ("[::1]:8765", 200),
        ("evil.example", 400),
        ("evil.example:8765", 400),
        ("localhost.evil.example", 400),
        ("localhost@evil.example", 400),
        ("127.0.0.1.nip.io", 400),
    ],
)
def test_only_the_bound_host_names_are_answered(client, host, status):
    r = client.get("/api/runs", headers={"host": host})
    assert r.status_code == status
    if status == 400:
        assert "--allowed-host" in r.json()["detail"] and SECRET not in r.text


def test_allowed_hosts_and_the_bound_host_are_answered_too(root):
    settings = ServeSettings(host="10.1.2.3", allowed_hosts=["runs.example.com"])
    with TestClient(create_ui_app(root, settings), base_url="http://runs.example.com") as c:
        assert c.get("/api/runs").status_code == 200
        assert c.get("/api/runs", headers={"host": "10.1.2.3:8765"}).status_code == 200
        assert c.get("/api/runs", headers={"host": "localhost"}).status_code == 200
        assert c.get("/api/runs", headers={"host": "other.example.com"}).status_code == 400


def test_cli_ui_takes_allowed_hosts_and_refuses_bad_ones(root, capsys, monkeypatch):
    import uvicorn

    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    assert main(["ui", str(root), "--allowed-host", "runs.example.com"]) == 0
    capsys.readouterr()
    with TestClient(started[0], base_url="http://runs.example.com") as c:
        assert c.get("/api/runs").status_code == 200
        assert c.get("/api/runs", headers={"host": "evil.example"}).status_code == 400
    assert main(["ui", str(root), "--allowed-host", "http://x/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allowed-host" in err and "Traceback" not in err
