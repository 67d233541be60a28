"""The book: every lesson executed once in fast mode (no error output), built by Jupyter Book, read in Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from helpers.ui.book import (
    BOOK_DIR,
    DOCS_DIR,
    DOCS_PAGES,
    build,
    gallery_page,
    jupyter_book,
    lesson_paths,
    results_page,
)

LESSONS = [path.stem for path in lesson_paths()]
REFERENCE_PAGES = ["index", *DOCS_PAGES, "results", "gallery"]


def test_gallery_lists_every_figure_with_its_manifest_entry(tmp_path):
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "files": {
                    "a.png": {"step": "figure1", "written": "today", "machine": "CPU A", "params": {"sp": 0.3}},
                    "c.png": {"step": "figure2", "written": "earlier", "params": {}},
                    "d.png": {"step": "figure3", "written": "now", "machine": "CPU B", "cells_machines": ["CPU A"]},
                    "e.png": {"step": "figure4", "written": "now", "machine": "CPU B", "cells_machines": ["CPU B"]},
                }
            }
        )
    )
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        (tmp_path / name).write_bytes(b"")
    page = gallery_page(tmp_path, "fast")
    assert "![a](figures/a.png)" in page and "Step `figure1`, written today on CPU A: sp = 0.3." in page
    assert "Step `figure2`, written earlier." in page  # no machine (written before they were recorded), no params
    assert "Step `figure3`, written now on CPU B from cells computed on CPU A." in page
    assert "Step `figure4`, written now on CPU B." in page  # its cells were computed where it was written
    assert "![b](figures/b.png)" in page and "Not in the manifest" in page and "Built in fast mode" in page


def test_other_models_get_their_own_gallery_and_tables_sections(tmp_path):
    other = tmp_path / "gemma3-270m"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"model": "gemma3-270m", "files": {"c.png": {"step": "s"}}}))
    (other / "c.png").write_bytes(b"")
    (other / "results_summary.md").write_text("| x |")
    (tmp_path / "notes").mkdir()  # a folder without a manifest is not a model's gallery
    (tmp_path / "notes" / "d.png").write_bytes(b"")
    heading = "## Gemma-3-270m, Q4_K_M weights dequantised to float32 (`figures/gemma3-270m/`)"
    page = gallery_page(tmp_path, "fast")
    assert heading in page and "![c](figures/gemma3-270m/c.png)" in page and "d.png" not in page
    tables = results_page(tmp_path, "fast")
    assert heading in tables and "### results summary" in tables and "| x |" in tables


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """The book built in fast mode: every lesson executed once (this is the suite's notebook run)."""
    pytest.importorskip("jupyter_book", reason="jupyter-book (requirements-dev.txt) builds the book")
    return build("fast", tmp_path_factory.mktemp("book") / "book")


@pytest.mark.slow
@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_runs_in_fast_mode_without_errors(book, lesson):
    assert lesson in book.errors, f"{lesson} was not executed"
    assert not book.errors[lesson], "\n".join(book.errors[lesson])


@pytest.mark.slow
def test_every_page_is_built_and_says_its_mode(book):
    for name in LESSONS + REFERENCE_PAGES:
        page = book.html / f"{name}.html"
        assert page.exists(), f"{page.name} missing from the site"
        assert "Built in fast mode" in page.read_text(), f"{page.name} does not say which mode built it"


def internal_targets(hrefs: list[str]) -> list[Path]:
    """Files that the page's own links (file:// URLs, anchors dropped) point to."""
    return [Path(unquote(urlparse(h).path)) for h in hrefs if urlparse(h).scheme == "file"]


def offline_page(browser, viewport: dict):
    """A page that can load file:// URLs only: every other request (a CDN's MathJax, say) is refused."""
    context = browser.new_context(viewport=viewport)
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
    return context.new_page()


def typeset_math(page) -> tuple[int, int]:
    """(formulas on the page, formulas MathJax has typeset), once MathJax has finished; 0 typeset if it never loaded."""
    loaded = page.evaluate(
        "async () => { const s = window.MathJax && MathJax.startup;"
        " if (!s || !s.promise) return false; await s.promise; return true; }"
    )
    formulas = page.locator(".math").count()
    return formulas, page.locator(".math mjx-container").count() if loaded else 0


@pytest.mark.browser
def test_equations_render_offline_in_chromium(tmp_path, chromium_options):
    """A one-page book built with the committed _config.yml: its formulas are typeset with no network at all."""
    pytest.importorskip("jupyter_book", reason="jupyter-book (requirements-dev.txt) builds the book")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive Chromium")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(BOOK_DIR / "_config.yml", src / "_config.yml")
    (src / "_toc.yml").write_text("format: jb-book\nroot: index\n")
    (src / "index.md").write_text(
        "# Math\n\nThe states $x_0, \\dots, x_L$ and\n\n$$\\mathrm{LR}_i = \\cos(x_i, x_{i+1})$$\n"
    )
    jupyter_book(src, tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**chromium_options)
        try:
            page = offline_page(browser, {"width": 900, "height": 600})
            page.goto((tmp_path / "_build" / "html" / "index.html").as_uri())
            assert typeset_math(page) == (2, 2)
            assert "\\cos" not in page.locator("main").inner_text()  # no formula left as LaTeX source
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.browser
def test_book_in_chromium(book, chromium_options, screenshot_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive Chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**chromium_options)
        try:
            page = offline_page(browser, {"width": 1280, "height": 900})  # the book is read without internet
            for name in LESSONS + REFERENCE_PAGES:
                path = book.html / f"{name}.html"
                response = page.goto(path.as_uri())
                assert response is not None and response.ok, f"{name}: page did not load"
                main = page.locator("main")
                shown = main.evaluate("m => [...m.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length")
                if name in LESSONS:
                    assert shown >= 1, f"{name}: no rendered figure"
                formulas, typeset = typeset_math(page)
                assert typeset == formulas, f"{name}: {formulas - typeset} of {formulas} formulas shown as LaTeX source"
                errors = main.locator(".traceback, .output.error")
                text = main.inner_text()
                assert errors.count() == 0 and "Traceback (most recent call last)" not in text, name
                unrendered = [row for row in ("|---|", "|\u2014|") if row in text]  # a table shown as its source
                assert not unrendered, f"{name}: a Markdown table is shown as text ({unrendered})"
                reprs = [r for r in ("<Figure size", "<Axes:") if r in text]  # a cell ending with a plot object
                assert not reprs, f"{name}: a plot object is shown as its repr ({reprs})"
                hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
                broken = [str(t) for t in internal_targets(hrefs) if not t.exists()]
                assert not broken, f"{name}: broken internal links {broken}"
            page.goto((book.html / "index.html").as_uri())
            page.screenshot(path=str(screenshot_dir / "book_index.png"), full_page=False)
        finally:
            browser.close()


def test_every_docs_page_is_in_the_book():
    """A page added to docs/ is staged (DOCS_PAGES) and listed in the table of contents, or this fails."""
    pages = sorted(path.stem for path in DOCS_DIR.glob("*.md"))
    toc = re.findall(r"^\s*- file: (\S+)\s*$", (BOOK_DIR / "_toc.yml").read_text(), flags=re.M)
    assert sorted(DOCS_PAGES) == pages
    assert set(pages) <= set(toc)
