"""How sure a number is (docs/method.md section 5): standard errors, bootstrap intervals, paired verdicts.

Accuracy carries the harness's standard error sqrt(p(1 - p) / (n - 1)). Perplexity carries a 95%
bootstrap interval over windows (tokens inside a window are correlated, so windows are the unit).
Two models measured on the same questions or windows are compared by a paired bootstrap: every draw
resamples the indices once and applies them to both, so questions answered alike cancel. The verdict
("better" / "worse" / "not resolved") is read off that interval, never written by hand; McNemar's
exact test on the discordant pairs is the closed-form check for accuracy, and Holm's step-down
correction adjusts several comparisons made at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

import numpy as np

RESAMPLES = 2000  # bootstrap draws (docs/method.md section 5)
SEED = 0  # one fixed seed, so every interval is reproducible
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """A paired difference (a minus b) with its interval and the verdict read from it."""

    diff: float
    low: float
    high: float
    verdict: str  # "better" / "worse" / "not resolved", for a relative to b
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy_se(correct: np.ndarray) -> float:
    """Standard error of mean accuracy, sqrt(p(1 - p) / (n - 1)), as lm-evaluation-harness reports it."""
    correct = _as_1d(correct, "correct")
    if correct.size < 2:
        raise ValueError(f"A standard error needs at least 2 questions, got {correct.size}.")
    p = float(correct.mean())
    return float(np.sqrt(p * (1 - p) / (correct.size - 1)))


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}.")
    return array


def _draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap index matrix (resamples, n), the same for a given (n, resamples, seed)."""
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}.")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _ppl(nll_sums: np.ndarray, tokens: np.ndarray) -> float:
    return float(np.exp(nll_sums.sum() / tokens.sum()))


def _check_windows(nll_sums, tokens) -> tuple[np.ndarray, np.ndarray]:
    nll_sums, tokens = _as_1d(nll_sums, "nll_sums"), _as_1d(tokens, "tokens")
    if nll_sums.shape != tokens.shape:
        raise ValueError(f"nll_sums and tokens differ in length: {nll_sums.size} vs {tokens.size}.")
    return nll_sums, tokens


def perplexity_interval(nll_sums, tokens, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Perplexity exp(sum NLL / sum tokens) and its 95% bootstrap interval, resampling whole windows."""
    nll_sums, tokens = _check_windows(nll_sums, tokens)
    idx = _draws(nll_sums.size, resamples, seed)
    samples = np.exp(nll_sums[idx].sum(1) / tokens[idx].sum(1))
    return Interval(_ppl(nll_sums, tokens), *_percentiles(samples))


def accuracy_interval(correct, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Accuracy and its 95% bootstrap interval over questions."""
    correct = _as_1d(correct, "correct")
    samples = correct[_draws(correct.size, resamples, seed)].mean(1)
    return Interval(float(correct.mean()), *_percentiles(samples))


def _verdict(low: float, high: float, higher_is_better: bool) -> str:
    if low <= 0 <= high:
        return "not resolved"
    return "better" if (low > 0) == higher_is_better else "worse"


def paired_accuracy(correct_a, correct_b, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Accuracy of a minus b on the same questions, paired bootstrap interval and verdict for a."""
    a, b = _as_1d(correct_a, "correct_a"), _as_1d(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"Paired accuracy needs the same questions: {a.size} vs {b.size} answers.")
    diff = a - b
    samples = diff[_draws(diff.size, resamples, seed)].mean(1)
    low, high = _percentiles(samples)
    return Comparison(float(diff.mean()), low, high, _verdict(low, high, True), int(diff.size))


def paired_perplexity(nll_a, nll_b, tokens, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Perplexity of a minus b on the same windows, paired bootstrap interval; lower perplexity is better."""
    nll_a, tokens = _check_windows(nll_a, tokens)
    nll_b, _ = _check_windows(nll_b, tokens)
    idx = _draws(tokens.size, resamples, seed)
    count = tokens[idx].sum(1)
    samples = np.exp(nll_a[idx].sum(1) / count) - np.exp(nll_b[idx].sum(1) / count)
    low, high = _percentiles(samples)
    diff = _ppl(nll_a, tokens) - _ppl(nll_b, tokens)
    return Comparison(diff, low, high, _verdict(low, high, False), int(tokens.size))


def mcnemar(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value: a binomial test on the discordant pairs (closed form)."""
    a, b = _as_1d(correct_a, "correct_a").astype(bool), _as_1d(correct_b, "correct_b").astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar needs the same questions: {a.size} vs {b.size} answers.")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order (reject where adjusted <= alpha)."""
    p = _as_1d(p_values, "p_values")
    order = np.argsort(p)
    scaled = p[order] * (p.size - np.arange(p.size))
    adjusted = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def paired_average(correct_a: list, correct_b: list, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Mean over tasks of per-task accuracy, a minus b: each task's questions resampled, paired, per draw."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("paired_average needs the same non-empty list of tasks for both models.")
    diffs = [_as_1d(a, "correct_a") - _as_1d(b, "correct_b") for a, b in zip(correct_a, correct_b, strict=True)]
    rng = np.random.default_rng(seed)
    samples = np.mean([d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1) for d in diffs], axis=0)
    low, high = _percentiles(samples)
    diff = float(np.mean([d.mean() for d in diffs]))
    return Comparison(diff, low, high, _verdict(low, high, True), int(sum(d.size for d in diffs)))
