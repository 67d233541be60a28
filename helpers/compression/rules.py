"""Allocation rules: per-layer scores -> per-layer kept dimensions at the parameter budget of constant slicing.

docs/method.md section 6. Every rule returns kept dimensions (multiples of 8) whose parameter count
is within one rounding step of constant slicing's realised count at the same SP, so that rules are
compared at the same size. Score-based rules (`lr`, `block_influence`, `angular`, `gradient`,
`measured`) go through the paper's SP/SB formula at constant slicing's size (`allocation.layer_allocation`,
"matched"); their scores are oriented "higher = more redundant = slice more".
`spare_ends` slices every layer alike (up to one multiple) except the first and last, which stay whole. `spectral` keeps
the most PCA energy for the budget, greedily, on spectra from one full-dimension rotation pass.
Pure NumPy: the model-dependent scores come from `helpers.evaluation.sensitivity`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from helpers.compression.allocation import (
    DEFAULT_FS_MAX,
    DEFAULT_MULTIPLE,
    ModelShape,
    budget,
    constant_dims,
    layer_allocation,
    params,
)

SCORED_RULES = ("lr", "block_influence", "angular", "gradient", "measured")  # through the SP/SB formula
RULES = ("constant", *SCORED_RULES, "spare_ends", "spectral")
BASE_SLICE = 0.0  # SB of every formula rule: the SB the selection book picks at every SP on SmolLM2


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


def rule_dims(
    rule: str,
    shape: ModelShape,
    sp: float,
    scores: pd.DataFrame | None = None,
    spectra: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Kept dimensions of `rule` at constant slicing's parameter count at `sp`.

    `scores` has one column per scored rule (higher = more redundant), one row per layer;
    `spectra` the full-dimension eigenvalues (spectral rule).
    """
    if rule not in RULES:
        raise ValueError(f"Unknown allocation rule {rule!r}; use one of {', '.join(RULES)}.")
    target = budget(shape, sp)
    if rule == "constant":
        return constant_dims(shape, sp)
    if rule == "spare_ends":
        return spare_ends_dims(target, shape)
    if rule == "spectral":
        if spectra is None:
            raise ValueError("The spectral rule needs the eigenvalue spectra (sensitivity.full_spectra).")
        return spectral_dims(spectra, target, shape)
    if scores is None or rule not in scores.columns:
        raise ValueError(f"Rule {rule!r} needs a '{rule}' column of per-layer scores.")
    return layer_allocation(scores[rule].to_numpy(dtype=np.float64), sp, BASE_SLICE, shape).kept_dim


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
