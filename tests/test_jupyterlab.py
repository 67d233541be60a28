"""The lessons in JupyterLab as `make lab` starts it: lesson 02 runs, its sliders redraw, a `.py` opens as notebook."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import jupytext
import psutil
import pytest
from browser_helpers import free_port, press, readout_values, wait_for_port

from helpers.infra.storage import DATA_DIR, FIGURES_DIR
from helpers.ui.lab import NOTEBOOKS_DIR, lab_command, lab_env

LESSON_02 = "02_slice_allocation_sliders.ipynb"
LESSON_01_PY = "01_hidden_states_and_lr.py"


def test_lab_command_binds_localhost_and_lets_the_users_options_win(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000, raising=False)
    plain = lab_command(9000)
    assert "--ServerApp.ip=127.0.0.1" in plain and "--ServerApp.port=9000" in plain and "--allow-root" not in plain
    assert not any("token" in option.lower() for option in plain)  # JupyterLab's own token stays on
    mine = lab_command(9000, ["--ip=0.0.0.0", "--ServerApp.root_dir=/elsewhere"])
    assert not [o for o in mine[:-2] if o.startswith(("--ServerApp.ip=", "--ServerApp.root_dir="))]  # each trait once
    assert mine[-2:] == ["--ip=0.0.0.0", "--ServerApp.root_dir=/elsewhere"] and "--ServerApp.port=9000" in mine
    monkeypatch.setattr(os, "geteuid", lambda: 0, raising=False)
    assert "--allow-root" in lab_command(9000)  # JupyterLab refuses to start as root without it


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab started by `python -m helpers lab` on copies of lessons 01 and 02: (URL, token, process, folder)."""
    pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive Chromium")
    pytest.importorskip("jupyterlab", reason="jupyterlab (requirements.txt) is what this test opens")
    root = tmp_path_factory.mktemp("lab")
    lessons, home = root / "notebooks", root / "home"  # copies: JupyterLab's autosave never touches tracked files
    lessons.mkdir()
    for name in (LESSON_02, LESSON_01_PY, LESSON_01_PY.replace(".py", ".ipynb")):
        shutil.copy2(NOTEBOOKS_DIR / name, lessons / name)
    shutil.copytree(FIGURES_DIR, root / "figures")  # what a lesson writes goes to this copy
    port, token = free_port(), secrets.token_hex(16)
    env = lab_env()
    env.update(HELPERS_FAST="1", HELPERS_DATA_DIR=str(DATA_DIR), HELPERS_FIGURES_DIR=str(root / "figures"))
    own = [  # this test's own folder and settings, never the user's
        "--no-browser",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={lessons}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
    ]
    command = [sys.executable, "-m", "helpers", "lab", "--port", str(port), "--", *own]
    log = root / "lab.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}", token, process, lessons
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(log.read_text()[-4000:])  # shown by pytest only when the test fails


@pytest.mark.slow
def test_lab_listens_on_localhost_only_and_keeps_its_token(lab):
    base, _, process, _ = lab
    listening = {c.laddr.ip for c in psutil.Process(process.pid).net_connections("inet") if c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}, listening
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/api/sessions", timeout=10)  # no token: refused
    assert refused.value.code == 403


@pytest.mark.slow
def test_saving_a_lesson_through_jupyterlab_writes_its_paired_py(lab):
    base, token, _, lessons = lab
    name = LESSON_01_PY.replace(".py", ".ipynb")
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/api/contents/{name}", headers=headers)) as reply:
        model = json.load(reply)
    marker = f"marker_{secrets.token_hex(4)} = 1"
    model["content"]["cells"].append({"cell_type": "code", "source": marker, "metadata": {}, "outputs": []})
    model["content"]["cells"][-1]["execution_count"] = None
    body = json.dumps({"type": "notebook", "format": "json", "content": model["content"]}).encode()
    request = urllib.request.Request(f"{base}/api/contents/{name}", data=body, headers=headers, method="PUT")
    urllib.request.urlopen(request).close()  # what JupyterLab's save sends
    paired = jupytext.read(lessons / LESSON_01_PY)  # read back from the .py alone
    assert paired.cells[-1].source == marker and len(paired.cells) == len(model["content"]["cells"])


def kernel_interpreters(process: subprocess.Popen) -> list[str]:
    """argv[0] of every ipykernel process that the JupyterLab server started."""
    children = psutil.Process(process.pid).children(recursive=True)
    return [c.cmdline()[0] for c in children if "ipykernel_launcher" in " ".join(c.cmdline())]


def texts(locator) -> list[str]:
    """textContent of every match: cells scrolled out of view are not rendered, so their innerText is empty."""
    return locator.evaluate_all("nodes => nodes.map(n => n.textContent)")


def wait_until_run(page, timeout_ms: int) -> None:
    """Wait until some cell has run, none waits or runs (`[*]`) and the kernel is idle (an error stops the queue)."""
    page.wait_for_function(
        r"""() => {
            const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
            const busy = [...panel.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'));
            const status = panel.querySelector('.jp-Notebook-ExecutionIndicator');
            const started = [...panel.querySelectorAll('.jp-InputPrompt')].some(p => /\d/.test(p.textContent));
            return started && !busy && status && status.getAttribute('data-status') === 'idle';
        }""",
        timeout=timeout_ms,
    )


@pytest.mark.slow
@pytest.mark.browser
def test_lesson_02_runs_in_jupyterlab_and_its_sliders_redraw(lab, chromium_options, screenshot_dir):
    from playwright.sync_api import expect, sync_playwright

    base, token, process, _ = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium_options)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/lab/tree/{LESSON_02}?token={token}", timeout=120_000)
            panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
            expect(panel.locator(".jp-Cell").first).to_be_visible(timeout=120_000)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=120_000)  # kernel connected
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").click()
            page.locator(".lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
            wait_until_run(page, 600_000)

            code_prompts = texts(panel.locator(".jp-CodeCell .jp-InputPrompt"))
            assert code_prompts and all(p.strip("[]: ").isdigit() for p in code_prompts), code_prompts
            outputs = texts(panel.locator(".jp-OutputArea-output"))
            errors = [o[:500] for o in outputs if "Traceback (most recent call last)" in o]
            assert not errors, errors
            assert kernel_interpreters(process) == [sys.executable]  # the .venv's interpreter under `make test`

            readout = panel.locator(".widget-html", has_text="realised mean slice")
            expect(readout).to_be_visible(timeout=30_000)
            handles = panel.locator(".widget-slider .noUi-handle")
            assert handles.count() == 2
            image = panel.locator("img.widget-image")
            image.scroll_into_view_if_needed()
            realised, sp, sb, sliced = readout_values(readout.inner_text())
            assert (sp, sb) == (0.30, 0.10) and abs(realised - sliced) < 2e-3 and abs(sliced - 0.30) < 0.02
            before = image.screenshot()

            press(page, handles.nth(0), "ArrowRight", 5)  # SP 0.30 -> 0.35, with the keyboard
            expect(readout).to_contain_text("requested SP 0.35", timeout=30_000)
            realised, sp, sb, sliced = readout_values(readout.inner_text())
            assert (sp, sb) == (0.35, 0.10) and abs(realised - sliced) < 2e-3 and abs(sliced - 0.35) < 0.02
            page.wait_for_timeout(500)  # the image widget's new value arrives with the readout's
            assert image.screenshot() != before, "Figure 1 did not change after moving SP"
            app = panel.locator(".jp-OutputArea-output:has(.widget-slider)")  # the sliders, readout and Figure 1
            app.evaluate("box => box.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(screenshot_dir / "jupyterlab_sliders.png"))
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.browser
def test_a_jupytext_py_lesson_opens_as_a_notebook(lab, chromium_options):
    from playwright.sync_api import expect, sync_playwright

    base, token, _, lessons = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium_options)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/lab/tree/{LESSON_01_PY}?token={token}", timeout=120_000)
            tab = page.locator(".lm-TabBar-tab.lm-mod-current", has_text=LESSON_01_PY)
            expect(tab).to_be_visible(timeout=120_000)
            panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
            expect(panel.locator(".jp-MarkdownCell").first).to_contain_text("Hidden states and Layer Redundancy")
            cells = len(jupytext.read(lessons / LESSON_01_PY).cells)  # jupytext's own reading of the file
            expect(page.locator("#jp-main-statusbar")).to_contain_text(f"Cell 1/{cells}")
            assert page.locator(".jp-FileEditor:visible").count() == 0, "the .py opened as a text file"
        finally:
            browser.close()
