"""Tiny random models the tests share: built from configs, with norm scales far from 1 so folding is exercised."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers.models.loading import tiny_model


def noisy_model(model_type: str, seed: int = 0, tied: bool = False):
    """A tiny model whose norm scales are random and far from 1, so folding is really exercised."""
    model = tiny_model(model_type, seed=seed, tie_word_embeddings=tied)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.25 + 1.5 * torch.rand(param.shape, generator=gen))
    return model


def run_without_helpers(script: str, args: list[str], tmp_path: Path) -> None:
    """Run `script` in a fresh interpreter that does not see this checkout (plain transformers only); fail on error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
