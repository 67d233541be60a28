"""The allocations of the rules that do not go through the SP/SB formula, and rank correlations of scores.

docs/method.md section 6. Both return kept dimensions (multiples of 8) whose parameter count is within one
rounding step of constant slicing's realised count at the same SP (`allocation.budget`), so that rules are
compared at the same size: `spare_ends_dims` slices every layer alike (up to one multiple) except the first
and last, which stay whole; `spectral_dims` keeps the most PCA energy for the budget, greedily, on spectra
from one full-dimension rotation pass. The registry of every rule is `helpers.evaluation.allocation_rules`.
Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from helpers.compression.allocation import (
    DEFAULT_FS_MAX,
    DEFAULT_MULTIPLE,
    ModelShape,
    params,
)


def spare_ends_dims(target: int, shape: ModelShape, multiple: int = DEFAULT_MULTIPLE) -> np.ndarray:
    """First and last layer whole, the others alike: the largest common dimension within `target`, then
    one more multiple for as many middle layers (spread over depth) as bring the count nearer `target`."""
    d, n = shape.hidden_size, shape.n_layers
    dims = np.full(n, d, dtype=np.int64)
    for k in range(d, multiple - 1, -multiple):
        dims[1:-1] = k
        if params(shape, dims) <= target:
            break
    for i in [*range(1, n - 1, 2), *range(2, n - 1, 2)]:  # every other layer first: spread over depth
        grown = dims.copy()
        grown[i] = min(d, grown[i] + multiple)
        if abs(params(shape, grown) - target) >= abs(params(shape, dims) - target):
            break
        dims = grown
    return dims


def kept_energy(spectra: Mapping[str, np.ndarray], dims: np.ndarray) -> float:
    """Sum over PCA boundaries (attn_i, mlp_i) of the fraction of the eigenvalue mass the top dims[i] keep."""
    total = 0.0
    for name, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        total += float(np.cumsum(values)[int(dims[int(name.split("_")[-1])]) - 1] / values.sum())
    return total


def _layer_gains(spectra: Mapping[str, np.ndarray], n_layers: int, d: int) -> np.ndarray:
    """gains[i, k]: energy fraction (over layer i's boundaries) held by its top k directions, k = 0..d."""
    gains = np.zeros((n_layers, d + 1))
    for name, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        gains[int(name.split("_")[-1]), 1:] += np.cumsum(values) / values.sum()
    return gains


def spectral_dims(
    spectra: Mapping[str, np.ndarray],
    target: int,
    shape: ModelShape,
    fs_max: float = DEFAULT_FS_MAX,
    multiple: int = DEFAULT_MULTIPLE,
) -> np.ndarray:
    """Keep the most PCA energy for `target` parameters: from full width, greedily drop the cheapest directions.

    Each step removes `multiple` directions from the layer where they lose the least energy per
    parameter saved, until the count reaches `target`; the last two states are compared and the
    one nearer the budget kept. `spectra` are the slicer's eigenvalues (attn_i, mlp_i) of a
    full-dimension rotation pass: the spectra of later layers after earlier ones are sliced are
    not known in advance, so the greedy treats them as fixed (a first-order choice).
    """
    d, n = shape.hidden_size, shape.n_layers
    floor = max(multiple, int(np.ceil((1 - fs_max) * d / multiple)) * multiple)
    gains = _layer_gains(spectra, n, d)
    dims = np.full(n, d, dtype=np.int64)
    count = params(shape, dims)
    while count > target:
        best, best_cost = None, np.inf
        for i in np.flatnonzero(dims - multiple >= floor):
            moved = dims.copy()
            moved[i] -= multiple
            saved = count - params(shape, moved)
            cost = (gains[i, dims[i]] - gains[i, moved[i]]) / max(saved, 1)
            if cost < best_cost:
                best, best_cost = moved, cost
        if best is None:
            raise ValueError(f"{target} parameters are below what FS_max={fs_max} allows for every layer.")
        previous, previous_count = dims, count
        dims, count = best, params(shape, best)
    return previous if abs(previous_count - target) < abs(count - target) else dims


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (ties get their average rank)."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlations(scores: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation between every pair of per-layer score columns (a square table)."""
    names = list(scores.columns)
    table = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            table.loc[a, b] = spearman(scores[a].to_numpy(), scores[b].to_numpy())
    return table.rename_axis("score").reset_index()
