"""How long `lmadapt ui`'s runs page takes with many runs.

    python -m bench.ui_load --runs 200 [--source RUN_DIR] [--repeats 5]

Copies one finished run (`--source`, or a tiny one trained here on a random 2-layer BERT) into
N directories under a temporary root, serves the dashboard with uvicorn on 127.0.0.1 (a thread
of this process), and measures: the /api/runs JSON endpoint (wall time per request with httpx,
and its size), and in headless Chromium the page load until the table holds all N rows
(`performance.now()` once the last row is there, i.e. from navigation start, including the
ui.js load and the /api/runs call), plus the browser's domContentLoaded and load event times.
The first /api/runs request reads every run's files (cold); later ones reuse the rows whose
files did not change (warm). Medians of `--repeats`; writes bench/results/ui_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ui_load.json"
ROWS = "return document.querySelectorAll('#runs tbody tr').length"


def tiny_bert(where: Path) -> Path:
    """A random 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as safetensors in `where`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lmadapt.models import resolve_model

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(where, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model("minilm").path).save_pretrained(where)
    return where


def tiny_run(where: Path) -> Path:
    """A finished classification run of a random 2-layer, 32-wide BERT (seconds on a CPU)."""
    from lmadapt.api import train
    from lmadapt.config import build_run_config

    tiny_bert(where / "bert")
    rows = ["text,label"] + [
        f"the film was {w},{lab}" for w, lab in [("good", "pos"), ("bad", "neg")] * 32
    ]
    (where / "train.csv").write_text("\n".join(rows) + "\n")
    config = {
        "model": str(where / "bert"),
        "task": {"type": "classification"},
        "method": {"name": "lora"},
        "data": {"train": str(where / "train.csv"), "dev": str(where / "train.csv")},
        "train": {"epochs": 2, "batch_size": 8, "eval_every": 4, "precision": "fp32", "threads": 1},
        "output_dir": str(where / "source"),
    }
    train(build_run_config(config))
    return where / "source"


def serve_in_thread(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def page_load(url: str, n: int, repeats: int, cold: bool) -> dict[str, float]:
    """Medians over `repeats` fresh navigations to the runs page, in milliseconds; `cold`:
    the server forgets its rows before each."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from lmadapt.ui import runs

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    table, dcl, load = [], [], []
    try:
        for _ in range(repeats):
            driver.get("about:blank")
            if cold:
                runs.forget()
            driver.get(url + "/")
            WebDriverWait(driver, 60, poll_frequency=0.005).until(
                lambda d: d.execute_script(ROWS) >= n
            )
            table.append(driver.execute_script("return performance.now()"))
            nav = driver.execute_script(
                "const e = performance.getEntriesByType('navigation')[0];"
                "return [e.domContentLoadedEventEnd, e.loadEventEnd]"
            )
            dcl.append(nav[0])
            load.append(nav[1])
    finally:
        driver.quit()
    label = "cold" if cold else "warm"
    return {
        f"table_filled_{label}_ms": round(statistics.median(table), 1),
        f"dom_content_loaded_{label}_ms": round(statistics.median(dcl), 1),
        f"load_event_{label}_ms": round(statistics.median(load), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--source", help="a finished run to copy (default: train a tiny one)")
    p.add_argument("--repeats", type=int, default=5, help="at least 2 (one cold, then warm)")
    a = p.parse_args()

    from lmadapt.ui.app import create_ui_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(a.source) if a.source else tiny_run(tmp)
        root = tmp / "runs"
        skip = shutil.ignore_patterns("checkpoints", "tb")
        for i in range(a.runs):
            shutil.copytree(source, root / f"run-{i:04d}", ignore=skip)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server, thread = serve_in_thread(create_ui_app(root), port)
        url = f"http://127.0.0.1:{port}"
        try:
            times, size = [], 0
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                r = httpx.get(url + "/api/runs", timeout=60)
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200 and len(r.json()) == a.runs, r.text[:200]
                size = len(r.content)
            browser = page_load(url, a.runs, a.repeats, cold=True)
            browser |= page_load(url, a.runs, a.repeats, cold=False)
        finally:
            server.should_exit = True
            thread.join(10)
    result = {
        "runs": a.runs,
        "source": str(a.source or "tiny run trained here"),
        "repeats": a.repeats,
        "api_runs_cold_ms": round(times[0], 1),
        "api_runs_warm_ms": round(statistics.median(times[1:]), 1),
        "api_runs_bytes": size,
        **browser,
        "machine": {
            "cpus": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
