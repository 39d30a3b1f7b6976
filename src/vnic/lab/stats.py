"""Small statistics for measurements: quantiles, binomial intervals, loss bursts. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def stdev(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1)."""
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def skewness(values: Sequence[float]) -> float:
    m, s = mean(values), stdev(values)
    return sum(((v - m) / s) ** 3 for v in values) / len(values)


def binomial_interval(expected: float, n: int, z: float = Z95) -> tuple[int, int]:
    """Counts of ``n`` trials with probability ``expected`` that fall inside the z interval.

    The normal approximation with continuity correction around n·p; with
    z = 1.96 a realised count outside it happens 5 % of the time by chance.
    """
    mu = n * expected
    sd = math.sqrt(n * expected * (1 - expected))
    return max(0, math.floor(mu - z * sd - 0.5)), min(n, math.ceil(mu + z * sd + 0.5))


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def loss_bursts(lost: Iterable[int]) -> list[int]:
    """Lengths of runs of consecutive lost sequence numbers."""
    runs: list[int] = []
    previous = None
    for seq in sorted(set(lost)):
        if previous is not None and seq == previous + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = seq
    return runs


def gilbert_interval(mean: float, burst: float, n: int, z: float = Z95) -> tuple[int, int]:
    """Like :func:`binomial_interval`, for the loss count of a Gilbert chain.

    Losses in bursts are correlated, so the count varies more than a
    binomial one: its variance is n·m(1−m)·(1+ρ)/(1−ρ), with ρ = 1 − p − r
    the correlation of the chain's state from one packet to the next
    (r = 1/burst, p = m·r/(1−m)). For bursts of 5 that is about 3 times the
    binomial standard deviation.
    """
    r = 1 / burst
    p = mean * r / (1 - mean)
    rho = 1 - p - r
    mu = n * mean
    sd = math.sqrt(n * mean * (1 - mean) * (1 + rho) / (1 - rho))
    return max(0, math.floor(mu - z * sd - 0.5)), min(n, math.ceil(mu + z * sd + 0.5))
