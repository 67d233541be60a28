"""Notebook 02 in a real browser: Voila serves it, Chromium moves the SP and SB sliders, the figure follows."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from browser_helpers import free_port, press, readout_values, wait_for_port

from helpers.infra.storage import DATA_DIR, REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "02_slice_allocation_sliders.ipynb"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


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


def test_sliders_redraw_the_figure_in_chromium(voila_url, chromium_options, screenshot_dir):
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
            realised, sp, sb, sliced = readout_values(readout.inner_text())
            assert (sp, sb) == (0.30, 0.10) and abs(realised - sliced) < 2e-3 and abs(sliced - 0.30) < 0.02
            before = image.screenshot()

            press(page, handles.nth(0), "ArrowRight", 5)  # SP 0.30 -> 0.35
            expect(readout).to_contain_text("requested SP 0.35", timeout=30_000)
            press(page, handles.nth(1), "ArrowRight", 3)  # SB 0.10 -> 0.13
            expect(readout).to_contain_text("SB 0.13", timeout=30_000)
            realised, sp, sb, sliced = readout_values(readout.inner_text())
            assert (sp, sb) == (0.35, 0.13) and abs(realised - sliced) < 2e-3 and abs(sliced - 0.35) < 0.02
            page.wait_for_timeout(500)  # the image widget's new value arrives with the readout's
            after = image.screenshot()
            assert after != before, "the figure did not change after moving SP and SB"
            page.screenshot(path=str(screenshot_dir / "sliders_voila.png"), full_page=True)

            press(page, handles.nth(0), "Home", 1)  # SP to 0: SB must follow it down
            expect(readout).to_contain_text(re.compile(r"requested SP 0\.00,.* SB 0\.00;"), timeout=30_000)
            press(page, handles.nth(0), "ArrowRight", 20)
            expect(readout).to_contain_text(re.compile(r"requested SP 0\.20,.* SB 0\.00;"), timeout=30_000)
        finally:
            browser.close()
