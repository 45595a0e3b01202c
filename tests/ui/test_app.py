"""The dashboard's JSON endpoints, path checks and bad run directories, through TestClient."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmadapt.cli import main
from lmadapt.ui.app import create_ui_app, report_html
from lmadapt.ui.runs import REWARDS, rewards


@pytest.fixture(scope="module")
def client(ui_root):
    with TestClient(create_ui_app(ui_root), base_url="http://localhost") as c:
        yield c


def _rows(client) -> dict[str, dict]:
    r = client.get("/api/runs")
    assert r.status_code == 200
    return {row["id"]: row for row in r.json()}


def test_runs_lists_every_entry_with_its_status(client):
    rows = _rows(client)
    expected = {
        "running": ("run", "running"),
        "interrupted": ("run", "interrupted"),
        "half-written": ("run", "bad"),
        "bad-yaml": ("run", "bad"),
        "bad-json": ("run", "bad"),
        "stream": ("continual", "finished"),
        "search_hpo": ("hpo", "finished"),
        "ner-run": ("run", "finished"),
        "chat-run": ("run", "finished"),
        "dpo-run": ("run", "finished"),
    }
    assert {i: (rows[i]["kind"], rows[i]["status"]) for i in expected} == expected
    lora = rows["lora-run"]
    assert (lora["status"], lora["task"], lora["method"], lora["metric"]) == (
        "finished",
        "classification",
        "lora",
        "accuracy",
    )
    assert lora["trainable_params"] < rows["bitfit-run"]["total_params"]
    assert isinstance(lora["best"], float) and lora["wall_seconds"] > 0
    resume = f"lmadapt train --resume {client.app.state.root / 'interrupted'}"
    assert rows["interrupted"]["hint"] == resume
    assert "no config.yaml" in rows["half-written"]["problems"][0]
    assert rows["search_hpo"]["best"] == pytest.approx(0.7)
    assert rows["chat-run"]["task"] == "generation"
    assert (rows["dpo-run"]["task"], rows["dpo-run"]["metric"]) == ("preference", "loss")
    assert "escape" not in rows and "foreign" not in rows  # a symlink out; no run files


def test_rows_are_read_again_when_their_files_change(ui_root, tmp_path):
    import json
    import shutil

    from lmadapt.ui.runs import scan

    shutil.copytree(ui_root / "lora-run", tmp_path / "r", ignore=shutil.ignore_patterns("model"))
    (first,) = scan(tmp_path)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    metrics["dev"]["accuracy"] = 0.875
    (tmp_path / "r" / "metrics.json").write_text(json.dumps(metrics))
    (again,) = scan(tmp_path)
    assert again["best"] == 0.875 != first["best"]
    (tmp_path / "r" / "metrics.json").write_text("{")
    assert scan(tmp_path)[0]["status"] == "bad"


def test_progress_of_a_running_run_reads_the_log_tail(client):
    (row,) = client.get("/api/progress", params={"id": "running"}).json()
    assert row["status"] == "running"
    assert (row["progress"]["step"], row["progress"]["loss"]) == (17, 0.25)  # half line skipped
    assert row["progress"]["epochs"] == 2
    assert "best" not in row and row["metric"] == "accuracy" and isinstance(row["latest"], float)


@pytest.mark.parametrize(
    "entry",
    ["..", "../..", "lora-run/../..", "/etc", "/", "escape", "escape/plots", "nope", "a\x00"],
)
def test_run_paths_never_leave_the_root(client, entry, ui_root):
    for url in ("/api/run", "/run", "/api/progress", "/compare", "/api/file"):
        r = client.get(url, params={"id": entry, "name": "plots/loss.png"})
        assert r.status_code == 404, (url, entry)
    assert client.post("/api/playground", json={"id": entry}).status_code == 404
    absolute = str(ui_root.parent / "outside" / "secret-run")
    assert client.get("/api/run", params={"id": absolute}).status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        "../bitfit-run/plots/loss.png",
        "../../outside/secret-run/plots/loss.png",
        "/etc/hostname",
        "config.yaml",
        "run.json",
        "plots",
        "plots/leak.png",
    ],
)
def test_files_are_images_of_the_run_only(client, name):
    assert client.get("/api/file", params={"id": "lora-run", "name": name}).status_code == 404


def test_run_detail_has_curves_confusion_and_report_images(client):
    r = client.get("/api/run", params={"id": "lora-run"})
    d = r.json()
    assert r.status_code == 200 and d["summary"]["problems"] == []
    steps, losses = d["curves"]["train"]["loss"]
    assert steps[:2] == [2, 4] and len(losses) == len(steps)
    assert "accuracy" in d["curves"]["dev"]
    (cm,) = d["confusion"]
    assert cm["labels"] == ["neg", "pos"] and sum(map(sum, cm["matrix"])) == 24
    assert d["config_data"]["method"]["name"] == "lora" and "lora" in d["config"]
    assert 'src="/api/file?id=lora-run&amp;name=plots%2Floss.png"' in d["report_html"]
    image = client.get("/api/file", params={"id": "lora-run", "name": "plots/loss.png"})
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content[:4] == b"\x89PNG"


def test_a_preference_run_shows_its_rewards_beside_the_base_models_and_its_margin_curve(client):
    d = client.get("/api/run", params={"id": "dpo-run"}).json()
    assert d["summary"]["problems"] == []
    (dev,) = d["rewards"]
    m = d["metrics"]["dev"]
    assert dev["split"] == "dev" and set(dev["trained"]) == set(dev["base"]) == set(REWARDS)
    assert dev["trained"] == {k: m[k] for k in REWARDS}
    assert dev["base"] == {k: m[f"base_{k}"] for k in REWARDS}
    # DPO's rewards are log-ratios to the base model: 0 for the base itself, a coin toss
    assert dev["base"]["reward_margin"] == 0 and dev["base"]["reward_accuracy"] == 0.5
    steps, margins = d["curves"]["dev"]["reward_margin"]
    assert steps == [1, 2] and all(isinstance(x, float) for x in margins)
    assert d["curves"]["dev"]["base_reward_margin"][1] == [0.0, 0.0]
    assert client.get("/api/run", params={"id": "lora-run"}).json()["rewards"] == []


def test_rewards_take_only_numbers_from_a_foreign_metrics_file():
    metrics = {
        "dev": {"reward_accuracy": 0.75, "reward_margin": "big", "base_reward_accuracy": True},
        "test": {"accuracy": 0.9},
        "steps": 3,
        "train": [1, 2],
    }
    assert rewards(metrics) == [
        {
            "split": "dev",
            "trained": {k: 0.75 if k == "reward_accuracy" else None for k in REWARDS},
            "base": dict.fromkeys(REWARDS),
        }
    ]


def test_continual_and_hpo_details(client):
    c = client.get("/api/run", params={"id": "stream"}).json()
    assert c["continual"]["matrix"] == [[0.9, None], [0.7, 0.8]]
    t = client.get("/api/run", params={"id": "search_hpo"}).json()["trials"]
    assert [x["state"] for x in t] == ["COMPLETE", "COMPLETE"]
    assert t[1]["intermediate"] == [[4, pytest.approx(0.64)], [8, pytest.approx(0.68)]]
    assert t[0]["metric"] == "accuracy" and "train.lr" in t[0]["params"]


@pytest.mark.parametrize("entry", ["bad-yaml", "bad-json", "half-written", "running"])
def test_bad_and_unfinished_runs_render_with_their_problem(client, entry):
    d = client.get("/api/run", params={"id": entry})
    assert d.status_code == 200
    assert client.get("/run", params={"id": entry}).status_code == 200
    if entry.startswith("bad"):
        assert d.json()["summary"]["status"] == "bad"
        assert d.json()["summary"]["problems"]


def test_report_html_shows_raw_html_as_text_and_drops_script_links():
    text = (
        "| text |\n|---|\n| <script>alert(1)</script> |\n\n<img src=x onerror=alert(1)>\n\n"
        "[a](javascript:alert(1)) [b](https://example.org) ![p](/etc/passwd.png) ![q](plots/q.png)"
    )
    html = report_html(text, "r")
    assert "<script" not in html and "<img src=x" not in html and "javascript:" not in html
    assert "&lt;script&gt;" in html and 'href="https://example.org"' in html
    assert 'src=""' in html and 'src="/api/file?id=r&amp;name=plots%2Fq.png"' in html


def test_pages_and_plotly_are_served_locally(client):
    for url in ("/", "/compare", "/playground", "/run?id=lora-run"):
        r = client.get(url)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
        # the runs table draws no plot, so it does not wait for Plotly's 4 MB
        assert ('src="/static/plotly.min.js"' in r.text) == (url != "/")
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and b"plotly" in js.content[:2000].lower()
    assert client.get("/static/app.py").status_code == 404


def test_playground_serves_the_loaded_run_through_the_serving_app(client):
    assert client.post("/serve/v1/classify", json={"texts": ["x"]}).status_code == 404
    assert client.post("/api/playground", json={"id": "bad-json"}).status_code == 400
    card = client.post("/api/playground", json={"id": "lora-run"}).json()
    assert (card["endpoint"], card["labels"]) == ("classify", ["neg", "pos"])
    r = client.post("/serve/v1/classify", json={"texts": ["the film was great"]})
    (row,) = r.json()["results"]
    assert r.status_code == 200 and set(row["probabilities"]) == {"neg", "pos"}
    assert client.get("/api/playground").json()["id"] == "lora-run"


def test_cli_refuses_a_public_host_and_a_missing_root(tmp_path, capsys):
    assert main(["ui", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--allow-no-auth" in capsys.readouterr().err
    assert main(["ui", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, files, kind",
    [
        ("train", {"config.yaml"}, "run"),
        ("continual", {"config.yaml"}, "continual"),
        ("compare", {"compare.json"}, "compare"),
        ("hpo", {"study.db"}, "hpo"),
    ],
)
def test_a_marked_directory_is_what_its_marker_says(tmp_path, command, files, kind):
    """compare and hpo mark their directories too: the marker must not turn them into runs."""
    from lmadapt.rundir import MARKER, mark
    from lmadapt.ui import runs

    mark(tmp_path, command)
    assert runs.kind_of(tmp_path, {MARKER, *files}) == kind
