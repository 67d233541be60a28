"""The book: every lesson executed once in fast mode (no error output), built by Jupyter Book, read in Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from helpers.infra.storage import FIGURES_DIR, atomic_path
from helpers.ui.book import BOOK_DIR, DOCS_DIR, DOCS_PAGES, build, gallery_page, lesson_paths, results_page

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


@pytest.mark.slow
@pytest.mark.browser
def test_book_in_chromium(book, chromium_options):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is needed to drive Chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**chromium_options)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for name in LESSONS + REFERENCE_PAGES:
                path = book.html / f"{name}.html"
                response = page.goto(path.as_uri())
                assert response is not None and response.ok, f"{name}: page did not load"
                main = page.locator("main")
                shown = main.evaluate("m => [...m.querySelectorAll('img')].filter(i => i.naturalWidth > 0).length")
                if name in LESSONS:
                    assert shown >= 1, f"{name}: no rendered figure"
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
            with atomic_path(FIGURES_DIR / "book_index.png") as tmp:
                page.screenshot(path=str(tmp), full_page=False)
        finally:
            browser.close()


def test_every_docs_page_is_in_the_book():
    """A page added to docs/ is staged (DOCS_PAGES) and listed in the table of contents, or this fails."""
    pages = sorted(path.stem for path in DOCS_DIR.glob("*.md"))
    toc = re.findall(r"^\s*- file: (\S+)\s*$", (BOOK_DIR / "_toc.yml").read_text(), flags=re.M)
    assert sorted(DOCS_PAGES) == pages
    assert set(pages) <= set(toc)
