"""Uncertainty: standard errors and bootstrap intervals against closed forms, paired verdicts, McNemar, Holm."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from helpers.evaluation import stats


def test_accuracy_se_is_the_harness_formula():
    correct = np.array([1] * 20 + [0] * 20)
    assert stats.accuracy_se(correct) == pytest.approx(np.sqrt(0.25 / 39))  # 0.080 at n = 40, p = 0.5
    assert stats.accuracy_se(np.ones(10)) == 0.0
    # the harness's definition: sample standard deviation (ddof=1) over sqrt(n)
    rng = np.random.default_rng(1)
    x = (rng.random(123) < 0.3).astype(float)
    assert stats.accuracy_se(x) == pytest.approx(x.std(ddof=1) / np.sqrt(x.size))


def test_bootstrap_intervals_match_the_normal_approximation():
    rng = np.random.default_rng(2)
    x = (rng.random(2000) < 0.6).astype(float)
    ci = stats.accuracy_interval(x)
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert ci.value == x.mean() and ci.low < ci.value < ci.high
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)
    # perplexity over equal windows: log ppl is the mean of window mean NLLs, sd / sqrt(W) around it
    per_window = rng.normal(3.0, 0.2, size=400)
    tokens = np.full(400, 255.0)
    ci = stats.perplexity_interval(per_window * tokens, tokens)
    assert ci.value == pytest.approx(np.exp(per_window.mean()))
    half = 1.96 * per_window.std(ddof=1) / np.sqrt(400)
    assert np.log(ci.high) - np.log(ci.low) == pytest.approx(2 * half, rel=0.1)


def test_identical_windows_give_a_zero_width_interval_and_a_fixed_seed_repeats():
    ci = stats.perplexity_interval(np.full(8, 2.0 * 100), np.full(8, 100.0))
    assert ci.low == pytest.approx(np.exp(2.0)) and ci.high == pytest.approx(np.exp(2.0))
    x = np.random.default_rng(3).random(50)
    assert stats.perplexity_interval(x, np.ones(50)) == stats.perplexity_interval(x, np.ones(50))


def test_planted_difference_is_resolved_and_a_model_against_itself_is_not():
    rng = np.random.default_rng(4)
    a = (rng.random(400) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:40]] = 0  # b misses 40 questions a gets right: 10 points worse
    better = stats.paired_accuracy(a, b)
    assert better.verdict == "better" and better.low > 0 and better.diff == pytest.approx(0.1)
    assert stats.paired_accuracy(b, a).verdict == "worse"
    same = stats.paired_accuracy(a, a)
    assert same.verdict == "not resolved" and same.low == same.high == 0.0
    # the paired interval is far narrower than the two separate intervals suggest
    separate = stats.accuracy_interval(a).high - stats.accuracy_interval(a).low
    assert better.high - better.low < separate

    tokens = np.full(32, 255.0)
    nll = rng.normal(3.0, 0.3, 32) * tokens
    worse_nll = nll + 0.05 * tokens  # b's perplexity is 5% higher on every window
    cmp = stats.paired_perplexity(nll, worse_nll, tokens)
    assert cmp.verdict == "better" and cmp.high < 0  # lower perplexity is better
    assert cmp.diff == pytest.approx(np.exp(nll.sum() / tokens.sum()) * (1 - np.exp(0.05)))
    assert stats.paired_perplexity(nll, nll, tokens).verdict == "not resolved"


def test_paired_average_over_tasks():
    rng = np.random.default_rng(6)
    a = [(rng.random(300) < 0.6).astype(float), (rng.random(100) < 0.4).astype(float)]
    b = [x.copy() for x in a]
    b[0][np.flatnonzero(a[0])[:30]] = 0  # 10 points worse on the first task, equal on the second
    cmp = stats.paired_average(a, b)
    assert cmp.diff == pytest.approx(0.05) and cmp.verdict == "better" and cmp.n == 400
    assert stats.paired_average(a, a).verdict == "not resolved"
    # one task alone is the ordinary paired comparison
    assert stats.paired_average(a[:1], b[:1]).diff == stats.paired_accuracy(a[0], b[0]).diff


def _mcnemar_by_enumeration(only_a: int, only_b: int) -> float:
    """Sum of the probabilities of every split of the discordant pairs no likelier than the observed one."""
    n = only_a + only_b
    probs = [comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[only_a] * (1 + 1e-12)))


def test_mcnemar_against_enumeration():
    for only_a, only_b in [(10, 0), (7, 3), (5, 5), (30, 12), (1, 0)]:
        a = np.array([1] * only_a + [0] * only_b + [1] * 20 + [0] * 9)
        b = np.array([0] * only_a + [1] * only_b + [1] * 20 + [0] * 9)
        assert stats.mcnemar(a, b) == pytest.approx(_mcnemar_by_enumeration(only_a, only_b))
    assert stats.mcnemar(np.ones(5), np.ones(5)) == 1.0
    assert stats.mcnemar([1] * 10, [0] * 10) == pytest.approx(2 / 1024)


def test_holm_on_a_textbook_case():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5]) == pytest.approx([0.5])
    assert stats.holm([0.9, 0.8]).max() == 1.0


def test_bad_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="at least 2 questions"):
        stats.accuracy_se([1])
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        stats.perplexity_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        stats.holm([])
