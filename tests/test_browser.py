"""End to end: the real server (uvicorn in a subprocess) and the drawing page in headless Chromium.

Needs Debian's chromium at /usr/bin/chromium (`.ci/run` installs it). Outside CI the test skips
with a reason when it is missing; with CI=true a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# The README's screenshot is refreshed only on request, so a test run leaves the work tree clean.
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# xdist_group: one worker runs the whole file (one Chromium and one server, started once).
pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("browser")]


def _require(condition: bool, reason: str) -> None:
    """Skip with `reason` on a developer machine; fail in CI, where the browser test must run."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; .ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    _require(CHROMIUM.exists(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "Playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_pt):
    """http://127.0.0.1:PORT of `digitsum serve` running a trained checkpoint in its own process."""
    model = trained_pt
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "digitsum.cli", "serve", "--checkpoint", str(model), "--port", str(port), "--no-access-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"digitsum serve exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "/api/health", timeout=1) as response:
                    if json.load(response)["model_loaded"]:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("digitsum serve did not answer /api/health within 60 s")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw strokes on the canvas with mouse events; points are in the canvas's 280x280 units."""
    box = page.locator("#pad").bounding_box()
    scale = box["width"] / 280

    def to_page(point):
        return box["x"] + point[0] * scale, box["y"] + point[1] * scale

    for stroke in strokes:
        page.mouse.move(*to_page(stroke[0]))
        page.mouse.down()
        for point in stroke[1:]:
            page.mouse.move(*to_page(point), steps=12)
        page.mouse.up()


def test_drawing_a_seven_and_picking_5_shows_digit_7_and_sum_12(chromium, server, tmp_path):
    page = chromium.new_page(viewport={"width": 900, "height": 580})
    page.goto(server + "/")
    draw(page, [[(70, 60), (210, 60)], [(210, 60), (160, 145), (120, 230)]])  # the bar, then the stem
    page.locator('#numbers button[data-number="5"]').click()
    page.wait_for_selector('#result[data-number="5"][data-busy="false"]', timeout=15_000)
    assert page.locator("#digit").inner_text() == "7"
    assert page.locator("#sum").inner_text() == "12"
    assert page.locator("#view").get_attribute("src").startswith("data:image/png;base64,")
    screenshot = DOCS_SCREENSHOT if os.environ.get("DIGITSUM_UPDATE_DOCS") else tmp_path / "web.png"
    screenshot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    page.close()


def test_clear_empties_the_canvas_and_the_answer(chromium, server):
    page = chromium.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
    page.goto(server + "/")
    draw(page, [[(140, 40), (140, 240)]])
    page.wait_for_selector("#result[data-digit]", timeout=15_000)
    page.locator("#clear").click()
    assert page.locator("#digit").inner_text() == "?"
    assert page.locator("#result").get_attribute("data-digit") is None
    page.close()


def test_the_page_fits_a_phone_screen_without_sideways_scrolling(chromium, server):
    page = chromium.new_page(viewport={"width": 360, "height": 740})
    page.goto(server + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    box = page.locator("#pad").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 360
    page.close()


def test_the_page_works_under_its_content_security_policy(chromium, server):
    """The page is served with a CSP (no inline script or style): nothing of it may be blocked."""
    page = chromium.new_page(viewport={"width": 900, "height": 580})
    violations = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security Policy" in message.text else None)
    response = page.goto(server + "/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page.evaluate("document.addEventListener('securitypolicyviolation', e => window.__csp = e.violatedDirective)")
    draw(page, [[(70, 60), (210, 60)], [(210, 60), (160, 145), (120, 230)]])
    page.wait_for_selector('#result[data-busy="false"][data-digit]', timeout=15_000)
    assert page.locator("#view").get_attribute("src").startswith("data:image/png;base64,")
    assert page.evaluate("window.__csp") is None and violations == []
    page.close()
