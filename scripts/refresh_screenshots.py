"""Refresh the committed browser screenshots in figures/ by running the browser tests that take them.

Usage: .venv/bin/python scripts/refresh_screenshots.py [jupyterlab] [voila] [book]   (default: all three)
Tests alone write their screenshots to their own temporary folders; only this command writes figures/.
`book` builds the whole book in fast mode first (minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from helpers.infra.storage import FIGURES_DIR, REPO_ROOT

TESTS = {  # the screenshot in figures/ -> the test that takes it
    "jupyterlab_sliders.png": "tests/test_jupyterlab.py::test_lesson_02_runs_in_jupyterlab_and_its_sliders_redraw",
    "sliders_voila.png": "tests/test_browser_sliders.py::test_sliders_redraw_the_figure_in_chromium",
    "book_index.png": "tests/test_book.py::test_book_in_chromium",
}
SHORT = {"jupyterlab": "jupyterlab_sliders.png", "voila": "sliders_voila.png", "book": "book_index.png"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shots", nargs="*", metavar="{jupyterlab,voila,book}", help="which screenshots (default: all)")
    names = parser.parse_args().shots or list(SHORT)
    unknown = sorted(set(names) - set(SHORT))
    if unknown:
        parser.error(f"unknown screenshot {', '.join(unknown)}; choose from {', '.join(SHORT)}")
    files = [FIGURES_DIR / SHORT[name] for name in names]
    before = {f: f.stat().st_mtime_ns if f.exists() else None for f in files}
    env = dict(os.environ, HELPERS_SCREENSHOTS_DIR=str(FIGURES_DIR))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *(TESTS[f.name] for f in files)]
    subprocess.run(command, cwd=REPO_ROOT, env=env)
    stale = [f.name for f in files if not f.exists() or f.stat().st_mtime_ns == before[f]]
    for f in files:
        print(f"{'NOT refreshed (test failed or skipped)' if f.name in stale else 'refreshed'}: {f}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
