"""LLM-Streamline's stability: confidence-weighted agreement of a compressed model with the dense one.

weight_i = softmax over questions of the standard deviation of the dense
model's option scores on question i; stability = sum of the weights of the
questions where both models are right or both are wrong (docs/method.md section 4).
A model compared with itself scores exactly 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_rows(scores: Sequence[Sequence[float]] | np.ndarray, name: str) -> list[np.ndarray]:
    rows = [np.asarray(row, dtype=np.float64) for row in scores]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size < 2 or not np.all(np.isfinite(row)):
            raise ValueError(f"{name}[{i}] must be a finite 1-D array of at least two option scores.")
    return rows


def stability(
    dense_option_scores: Sequence[Sequence[float]] | np.ndarray,
    pruned_option_scores: Sequence[Sequence[float]] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
) -> float:
    """Stability in [0, 1] of a compressed model against the dense model over the same questions."""
    dense = _as_rows(dense_option_scores, "dense_option_scores")
    pruned = _as_rows(pruned_option_scores, "pruned_option_scores")
    labels = np.asarray(labels, dtype=np.int64)
    if not (len(dense) == len(pruned) == len(labels)) or len(dense) == 0:
        raise ValueError(
            f"Need the same non-zero number of questions: {len(dense)} dense, {len(pruned)} pruned, "
            f"{len(labels)} labels."
        )
    for i, (d, p, y) in enumerate(zip(dense, pruned, labels, strict=True)):
        if d.shape != p.shape or not 0 <= y < d.size:
            raise ValueError(f"Question {i}: option counts differ ({d.size} vs {p.size}) or label {y} is out of range.")
    spread = np.array([d.std() for d in dense])
    weights = np.exp(spread - spread.max())
    weights /= weights.sum()
    dense_right = np.array([int(np.argmax(d)) == y for d, y in zip(dense, labels, strict=True)])
    pruned_right = np.array([int(np.argmax(p)) == y for p, y in zip(pruned, labels, strict=True)])
    return float(weights[dense_right == pruned_right].sum())
