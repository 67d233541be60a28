"""Depth-pruning scores: which blocks of consecutive layers change the residual stream least.

Block scores (ShortGPT, angular distance, LLM-Streamline) compare the residual
stream x_l (input of layer l) with x_{l+n} (output of layer l+n-1) for every
start l and block length n. A per-layer `LayerStatistic` sees one layer at a
time, so `block_scores` keeps the states x_0..x_L of one batch only, adds that
batch's token cosines and angular distances to running sums, and drops the
batch: memory does not grow with the corpus. See docs/method.md section 4.
Removing the chosen layers is `helpers.compression.depth`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import AutoConfig

from helpers.analysis import capture
from helpers.analysis.capture import LayerStatistic, stream_statistics
from helpers.analysis.redundancy import NAN_COSINE
from helpers.infra.integrity import code_fingerprint, discard, sha256_text, weights_fingerprint
from helpers.infra.storage import CACHE_DIR, atomic_path, cache_key, slug
from helpers.infra.textdata import load_text, token_windows
from helpers.models.adapters import get_adapter
from helpers.models.loading import load_dense, resolve_model

METHODS = ("shortgpt", "gromov", "streamline")


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to unit length (float32) and a mask of rows that were non-zero."""
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    return x / norms.clamp(min=torch.finfo(torch.float32).tiny), norms[..., 0] > 0


@dataclass
class BlockScores:
    """Mean token cosines and angular distances between x_l and x_m for all 0 <= l < m <= L.

    `cos_all[l, m]` averages over every calibration token, `cos_last[l, m]` over
    the last token of each window; `ang_*` average arccos(cos) / pi the same way.
    Entries with m <= l are NaN.
    """

    cos_all: np.ndarray
    cos_last: np.ndarray
    ang_all: np.ndarray
    ang_last: np.ndarray
    tokens: int
    windows: int

    @property
    def n_layers(self) -> int:
        return self.cos_all.shape[0] - 1

    def lr(self) -> np.ndarray:
        """Layer Redundancy per layer: mean cos(x_l, x_{l+1}) over all tokens (the n = 1 row)."""
        return np.diag(self.cos_all, k=1)

    def bi(self) -> np.ndarray:
        """ShortGPT's Block Influence per layer: 1 - LR."""
        return 1.0 - self.lr()

    def by_length(self, kind: str = "cos_all") -> np.ndarray:
        """Matrix indexed [n - 1, l] holding score(x_l, x_{l+n}); NaN where l + n > L (the heatmap)."""
        matrix = getattr(self, kind, None)
        if not isinstance(matrix, np.ndarray):
            raise ValueError(f"kind must be one of cos_all, cos_last, ang_all, ang_last; got {kind!r}.")
        size = self.n_layers
        out = np.full((size, size), np.nan)
        for n in range(1, size + 1):
            out[n - 1, : size - n + 1] = np.diag(matrix, k=n)
        return out

    def choose(self, method: str, n: int) -> list[int]:
        """The layers `method` removes for n layers: ShortGPT (n lowest BI), gromov or streamline (a block)."""
        if not 1 <= n < self.n_layers:
            raise ValueError(f"n must be between 1 and {self.n_layers - 1} (the model has {self.n_layers} layers).")
        if method == "shortgpt":
            return sorted(int(i) for i in np.argsort(self.bi(), kind="stable")[:n])
        if method == "gromov":
            start = int(np.argmin(np.diag(self.ang_last, k=n)))
        elif method == "streamline":
            start = int(np.argmax(np.diag(self.cos_all, k=n)))
        else:
            raise ValueError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
        return list(range(start, start + n))

    def table(self) -> pd.DataFrame:
        """Long table: one row per (l, n) with every score."""
        rows = []
        for n in range(1, self.n_layers + 1):
            for start in range(self.n_layers - n + 1):
                end = start + n
                rows.append(
                    dict(
                        start=start,
                        n=n,
                        cos_all=self.cos_all[start, end],
                        cos_last=self.cos_last[start, end],
                        ang_all=self.ang_all[start, end],
                        ang_last=self.ang_last[start, end],
                    )
                )
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> Path:
        """Write the arrays to an .npz atomically."""
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                **{k: getattr(self, k) for k in ("cos_all", "cos_last", "ang_all", "ang_last")},
                counts=np.array([self.tokens, self.windows]),
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> BlockScores:
        """Read an .npz written by `save`."""
        with np.load(path) as data:
            tokens, windows = (int(v) for v in data["counts"])
            return cls(data["cos_all"], data["cos_last"], data["ang_all"], data["ang_last"], tokens, windows)


class _PairSums:
    """Running sums of cosines and angular distances for every pair of residual states."""

    def __init__(self, size: int) -> None:
        self.sums = {
            k: torch.zeros(size, size, dtype=torch.float64) for k in ("cos_all", "cos_last", "ang_all", "ang_last")
        }
        self.tokens = 0
        self.windows = 0

    def add(self, states: list[torch.Tensor], mask: torch.Tensor) -> None:
        units = [_unit(x) for x in states]
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # last real token of each window
        rows = torch.arange(mask.shape[0], device=mask.device)
        self.tokens += int(mask.sum())
        self.windows += int(mask.any(1).sum())
        for low in range(len(states)):
            for high in range(low + 1, len(states)):
                (a, a_ok), (b, b_ok) = units[low], units[high]
                cos = (a * b).sum(-1).clamp(-1.0, 1.0)
                cos = torch.where(a_ok & b_ok, cos, torch.full_like(cos, NAN_COSINE))
                ang = torch.arccos(cos) / torch.pi
                for name, values in (("cos", cos), ("ang", ang)):
                    self.sums[f"{name}_all"][low, high] += values[mask].sum(dtype=torch.float64).cpu()
                    picked = values[rows, last][mask.any(1)]
                    self.sums[f"{name}_last"][low, high] += picked.sum(dtype=torch.float64).cpu()

    def result(self) -> BlockScores:
        if self.tokens == 0:
            raise ValueError("No tokens were seen; pass at least one window with unmasked tokens.")
        size = self.sums["cos_all"].shape[0]
        upper = torch.triu(torch.ones(size, size, dtype=torch.bool), diagonal=1)
        out = {}
        for name, total in self.sums.items():
            count = self.windows if name.endswith("last") else self.tokens
            out[name] = torch.where(upper, total / count, torch.full_like(total, float("nan"))).numpy()
        return BlockScores(**out, tokens=self.tokens, windows=self.windows)


class _BatchStates(LayerStatistic):
    """Holds x_0..x_L of the current batch only; after the last layer, adds every pair to the sums."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.states: dict[int, torch.Tensor] = {}
        self.sums = _PairSums(n_layers + 1)

    def update(self, layer: int, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        if layer == 0:
            self.states[0] = x_in
        self.states[layer + 1] = x_out
        if layer == self.n_layers - 1:
            self.sums.add([self.states[i] for i in range(self.n_layers + 1)], mask)
            self.states.clear()


def block_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> BlockScores:
    """Stream `input_ids` (windows, seqlen) through the model; cosines/angles between all residual states."""
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a non-empty (windows, seqlen) tensor, got {tuple(input_ids.shape)}.")
    collector = _BatchStates(len(get_adapter(model).layers(model)))
    stream_statistics(model, input_ids, [collector], batch_size, attention_mask, progress, desc="block scores")
    return collector.sums.result()


def cached_block_scores(
    model_name: str,
    text: str,
    seqlen: int,
    n_windows: int,
    batch_size: int = 8,
    progress: bool = True,
    model=None,
    tokenizer=None,
) -> BlockScores:
    """`block_scores` for (model, text, seqlen, windows), computed once and cached under data/cache/depth."""
    corpus = load_text(text)
    source = resolve_model(model_name)
    key = cache_key(
        text=sha256_text(corpus),
        weights=weights_fingerprint(source),
        code=code_fingerprint(sys.modules[__name__], capture),
        seqlen=seqlen,
        windows=n_windows,
    )
    path = CACHE_DIR / "depth" / f"{slug(model_name)}__{slug(text)}__L{seqlen}__N{n_windows}__{key}.npz"
    if path.exists():
        try:
            scores = BlockScores.load(path)
            n_layers = AutoConfig.from_pretrained(source).num_hidden_layers
            if scores.cos_all.shape != (n_layers + 1, n_layers + 1) or not np.all(np.isfinite(scores.lr())):
                raise ValueError(f"expected {n_layers + 1} x {n_layers + 1} finite scores")
            return scores
        except Exception as err:  # any unreadable or inconsistent entry is recomputed
            discard(path, f"{type(err).__name__}: {err}")
    if model is None:
        model, tokenizer = load_dense(model_name)
    scores = block_scores(model, token_windows(tokenizer, corpus, seqlen, n_windows), batch_size, progress=progress)
    scores.save(path)
    return scores


def chosen_layers(scores: BlockScores, n: int) -> pd.DataFrame:
    """The layers every method removes for n layers, one row per method."""
    return pd.DataFrame([dict(method=m, n=n, layers=scores.choose(m, n)) for m in METHODS])
