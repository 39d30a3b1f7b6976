"""Measurement statistics. No root."""

from __future__ import annotations

import random

import pytest

from vnic.lab import stats


def test_quantile_interpolates() -> None:
    assert stats.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert stats.quantile([5], 0.99) == 5
    with pytest.raises(ValueError):
        stats.quantile([], 0.5)


def test_binomial_interval_covers_about_95_percent() -> None:
    rng = random.Random(1)
    n, p = 2000, 0.03
    lo, hi = stats.binomial_interval(p, n)
    inside = sum(lo <= sum(rng.random() < p for _ in range(n)) <= hi for _ in range(400))
    assert 0.92 <= inside / 400 <= 0.99


def test_wilson_contains_the_estimate() -> None:
    lo, hi = stats.wilson(30, 1000)
    assert lo < 0.03 < hi and hi - lo < 0.03


def test_loss_bursts_are_runs_of_consecutive_numbers() -> None:
    assert stats.loss_bursts([9, 3, 4, 5, 7, 8]) == [3, 3]
    assert stats.loss_bursts([]) == []


def test_skewness_sign() -> None:
    assert stats.skewness([1, 1, 1, 1, 10]) > 1
    assert abs(stats.skewness([1, 2, 3, 4, 5])) < 1e-9
