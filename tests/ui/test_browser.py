"""The dashboard in a real browser: headless Chromium driven by selenium against uvicorn serving
the tiny runs of `ui_root`. Screenshots go to a pytest tmp dir, and also to
$LMADAPT_UI_SCREENSHOTS when it is set."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BROWSER and DRIVER),
        reason="needs Chromium and chromedriver on PATH (Debian: apt-get install chromium "
        "chromium-driver; `make test-slow` installs them where it can)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Background:
    """uvicorn serving `app` from a thread, stopped by `close`."""

    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1400,1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


@pytest.fixture(scope="module")
def browser(ui_root, tmp_path_factory):
    from lmadapt.ui.app import create_ui_app

    port = free_port()
    server = Background(create_ui_app(ui_root), port)
    driver = chromium()
    shots = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("LMADAPT_UI_SCREENSHOTS"):
        shots.append(Path(os.environ["LMADAPT_UI_SCREENSHOTS"]))
        shots[-1].mkdir(parents=True, exist_ok=True)

    def shot(name: str) -> None:
        """The whole page: the window is stretched to its height first."""
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height, 1000), 5000))
        for d in shots:
            assert driver.save_screenshot(str(d / f"{name}.png"))
        driver.set_window_size(1400, 1000)

    try:
        yield driver, f"http://127.0.0.1:{port}", shot, shots[0]
    finally:
        driver.quit()
        server.close()


def wait(driver, css: str, timeout: float = 20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def rows(driver, *attrs: str) -> list[list[str]]:
    """`attrs` of every row of the runs table, read in one script: the page redraws the table on
    each poll, so rows found one call earlier may be gone (stale) by the next."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#runs tbody tr')]"
        ".map((tr) => arguments[0].map((a) => tr.getAttribute(a)))",
        list(attrs),
    )


def test_runs_run_compare_and_playground_in_chromium(browser, ui_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver, url, shot, shots = browser

    # Runs page: every entry listed with its status; the filter narrows the table.
    driver.get(url + "/")
    wait(driver, '#runs tr[data-id="lora-run"]')
    statuses = dict(rows(driver, "data-id", "data-status"))
    assert statuses["lora-run"] == statuses["bitfit-run"] == "finished"
    assert (statuses["running"], statuses["bad-yaml"]) == ("running", "bad")
    shot("runs")

    # A run still training: its row follows the log without a reload.
    with open(ui_root / "running" / "log.jsonl", "a") as f:
        f.write('\n{"step": 19, "epoch": 1, "loss": 0.125}\n')
    live = '#runs tr[data-id="running"] .progress'
    WebDriverWait(driver, 10).until(
        lambda d: (
            "step 19"
            in d.execute_script(f"return document.querySelector('{live}')?.textContent ?? ''")
        )
    )
    driver.find_element(By.ID, "filter").send_keys("bitfit")
    assert rows(driver, "data-id") == [["bitfit-run"]]

    # Run page: Plotly draws the curves (an svg inside the graph div) and the confusion matrix.
    driver.get(url + "/run?id=lora-run")
    wait(driver, "#loss-plot .main-svg")
    wait(driver, "#confusion-0 .main-svg")
    assert "lmadapt run" in driver.find_element(By.ID, "report").text
    assert (
        driver.find_elements(By.CSS_SELECTOR, "#report img")[0].get_attribute("naturalWidth") != "0"
    )
    shot("run")

    # A continual stream's accuracy matrix and an hpo study's trials, drawn as well.
    driver.get(url + "/run?id=stream")
    wait(driver, "#continual-plot .main-svg")
    shot("continual")
    driver.get(url + "/run?id=search_hpo")
    wait(driver, "#trials-plot .main-svg")
    assert "COMPLETE" in driver.find_element(By.ID, "trials").text
    shot("hpo")

    # A preference run: its rewards beside the base model's, and the dev margin over training.
    driver.get(url + "/run?id=dpo-run")
    wait(driver, "#margin-plot .main-svg")
    assert "base (untrained)" in driver.find_element(By.ID, "rewards").text
    names = driver.execute_script(
        "return document.getElementById('margin-plot').data.map((t) => t.name)"
    )
    assert names == ["dev reward margin", "base model"]
    shot("preference")

    # Compare: two runs overlaid, side by side, config diff naming the method.
    driver.get(url + "/compare?id=lora-run&id=bitfit-run")
    wait(driver, "#overlay-loss .main-svg")
    traces = driver.execute_script("return document.getElementById('overlay-loss').data.length")
    assert traces == 2
    wait(driver, "#diff tbody tr")
    assert "method.name" in driver.find_element(By.ID, "diff").text
    shot("compare")

    # Playground: load the run, classify a text, probabilities drawn; attributions shown.
    driver.get(url + "/playground?id=lora-run")
    wait(driver, '#run-select option[value="lora-run"]')
    driver.find_element(By.ID, "load").click()
    wait(driver, "#try:not([hidden])", timeout=60)
    driver.find_element(By.ID, "input").send_keys("the plot was wonderful")
    driver.find_element(By.ID, "explain").click()
    driver.find_element(By.ID, "go").click()
    wait(driver, "#probs-plot .main-svg", timeout=60)
    wait(driver, "#output mark", timeout=60)
    assert driver.find_element(By.CSS_SELECTOR, "#output .prediction").text.startswith("label: ")
    shot("playground")

    # An NER run: the entities it finds are highlighted in the text.
    Select(driver.find_element(By.ID, "run-select")).select_by_value("ner-run")
    driver.find_element(By.ID, "load").click()
    wait(driver, "#explain-box:not([hidden])", timeout=60)
    wait(driver, "#loaded", timeout=60)
    WebDriverWait(driver, 60).until(lambda d: "ner-run" in d.find_element(By.ID, "loaded").text)
    driver.find_element(By.ID, "input").clear()
    driver.find_element(By.ID, "input").send_keys(
        "Yesterday , Alice Smith flew to New York again ."
    )
    driver.find_element(By.ID, "explain").click()  # off: entities only
    driver.find_element(By.ID, "go").click()
    wait(driver, "#output .highlighted", timeout=60)
    assert driver.find_element(By.CSS_SELECTOR, "#output .prediction").text.endswith("entities")
    shot("ner")

    # ... and a chat run answers in a stream of chunks, through the same serving code.
    Select(driver.find_element(By.ID, "run-select")).select_by_value("chat-run")
    driver.find_element(By.ID, "load").click()
    wait(driver, "#explain-box[hidden]", timeout=60)
    driver.find_element(By.ID, "input").clear()
    driver.find_element(By.ID, "input").send_keys("what is 2 plus 2?")
    driver.find_element(By.ID, "temperature").send_keys("0.8")  # greedy: the tiny model is mute
    driver.find_element(By.ID, "go").click()
    answer = wait(driver, "#output .answer[data-finish]", timeout=60)
    assert answer.get_attribute("data-finish") in ("stop", "length")
    shot("chat")

    # no script error and no content-security-policy refusal on any page (favicon aside)
    errors = [e["message"] for e in driver.get_log("browser") if "favicon" not in e["message"]]
    assert errors == []
    assert {p.name for p in shots.iterdir()} == {
        "runs.png",
        "run.png",
        "continual.png",
        "hpo.png",
        "preference.png",
        "compare.png",
        "playground.png",
        "ner.png",
        "chat.png",
    }
