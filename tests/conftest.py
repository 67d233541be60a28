"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the real default model, SmolLM2-135M, on CPU in float32."""
    from helpers.compression.checkpoints import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def tok(smollm):
    return smollm[1]


@pytest.fixture(scope="session")
def book_windows(tok):
    """Eight 128-token windows of Pride and Prejudice."""
    from helpers.infra.textdata import load_windows

    return load_windows(tok, "pride-and-prejudice", 128, 8)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's build; never a browser that Playwright downloads
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium_options() -> dict:
    """Keyword arguments for Playwright's `chromium.launch`; skips the test where Debian's Chromium is absent."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to run this test")
    return {"executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    """Where a browser test saves its screenshots: its own temporary folder, never figures/.

    Only scripts/refresh_screenshots.py points HELPERS_SCREENSHOTS_DIR at figures/ to refresh the committed ones.
    """
    return Path(os.environ.get("HELPERS_SCREENSHOTS_DIR") or tmp_path)
