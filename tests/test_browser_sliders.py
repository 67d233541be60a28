"""Notebook 02 in a real browser: Voila serves it, Chromium moves the SP and SB sliders, the figure follows."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from helpers.infra.storage import DATA_DIR, FIGURES_DIR, REPO_ROOT, atomic_path

NOTEBOOK = REPO_ROOT / "notebooks" / "02_slice_allocation_sliders.ipynb"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"voila exited with code {process.returncode} before serving")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"voila did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive Chromium")
    pytest.importorskip("voila", reason="voila (pip) is needed to serve the notebook")
    port = free_port()
    log = tmp_path_factory.mktemp("voila") / "voila.log"
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HELPERS_FAST="1", HELPERS_DATA_DIR=str(DATA_DIR), PYTHONPATH=path)
    command = [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(log.read_text()[-3000:])  # shown by pytest only when the test fails


def readout_values(text: str) -> tuple[float, float, float]:
    """(realised mean, requested SP, requested SB) parsed from the app's readout."""
    found = re.search(r"realised mean slice: ([\d.]+) \(requested SP ([\d.]+), SB ([\d.]+)", text)
    assert found, f"readout not understood: {text!r}"
    return tuple(float(v) for v in found.groups())


def press(page, handle, key: str, times: int) -> None:
    handle.focus()
    for _ in range(times):
        page.keyboard.press(key)


def test_sliders_redraw_the_figure_in_chromium(voila_url, chromium_options):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium_options)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            page.goto(voila_url, timeout=120_000)
            readout = page.locator(".widget-html", has_text="realised mean slice")
            expect(readout).to_be_visible(timeout=120_000)
            image = page.locator("img.widget-image")
            handles = page.locator(".widget-slider .noUi-handle")
            assert handles.count() == 2
            realised, sp, sb = readout_values(readout.inner_text())
            assert (sp, sb) == (0.30, 0.10) and abs(realised - 0.30) < 1e-3
            before = image.screenshot()

            press(page, handles.nth(0), "ArrowRight", 5)  # SP 0.30 -> 0.35
            expect(readout).to_contain_text("requested SP 0.35", timeout=30_000)
            press(page, handles.nth(1), "ArrowRight", 3)  # SB 0.10 -> 0.13
            expect(readout).to_contain_text("SB 0.13", timeout=30_000)
            realised, sp, sb = readout_values(readout.inner_text())
            assert (sp, sb) == (0.35, 0.13) and abs(realised - 0.35) < 1e-3
            page.wait_for_timeout(500)  # the image widget's new value arrives with the readout's
            after = image.screenshot()
            assert after != before, "the figure did not change after moving SP and SB"
            with atomic_path(FIGURES_DIR / "sliders_voila.png") as tmp:
                page.screenshot(path=str(tmp), full_page=True)

            press(page, handles.nth(0), "Home", 1)  # SP to 0: SB must follow it down
            expect(readout).to_contain_text("requested SP 0.00, SB 0.00", timeout=30_000)
            press(page, handles.nth(0), "ArrowRight", 20)
            expect(readout).to_contain_text("requested SP 0.20, SB 0.00", timeout=30_000)
        finally:
            browser.close()
