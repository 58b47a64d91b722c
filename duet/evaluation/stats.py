"""Confidence intervals for accuracies and their differences (standard library only).

* :func:`wilson`: the Wilson score interval of a proportion (good at small n and near 0 or 1).
* :func:`paired_difference`: accuracy(B) - accuracy(A) on the same problems, with Newcombe's score
  interval for paired proportions (method 10, Newcombe 1998, Stat. Med. 17:2635), plus McNemar's exact
  p-value on the discordant pairs.
* :func:`unpaired_difference`: the same for independent samples (Newcombe's hybrid score interval).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n``; None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def normal_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wald (normal approximation) interval, for comparison; None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


@dataclass(frozen=True)
class Difference:
    """B's accuracy minus A's, with a 95% interval; for paired data also the flips and McNemar's p."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float
    low: float
    high: float
    paired: bool
    fixed: int = 0  # A wrong, B right
    broken: int = 0  # A right, B wrong
    p_value: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: list[bool], b: list[bool], z: float = Z95) -> Difference | None:
    """acc(b) - acc(a) over pairs ``(a[i], b[i])`` of the same problems; None when there are none."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must have the same length")
    n = len(a)
    if n == 0:
        return None
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    broken = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    fixed = sum(1 for x, y in zip(a, b, strict=True) if not x and y)
    neither = n - both - broken - fixed
    # Newcombe's method 10 with p1 = acc(b), p2 = acc(a): theta = p1 - p2.
    s1, s2 = both + fixed, both + broken
    p1, p2 = s1 / n, s2 / n
    l1, u1 = wilson(s1, n, z)
    l2, u2 = wilson(s2, n, z)
    # phi: the correlation of the 2x2 table (rows: b right/wrong, columns: a right/wrong), 0 if degenerate,
    # with Newcombe's continuity correction of a positive correlation.
    margins = (both + fixed) * (broken + neither) * (both + broken) * (fixed + neither)
    cross = both * neither - fixed * broken
    if cross > 0:
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(margins) if margins else 0.0
    theta = p1 - p2
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Difference(n, p2, p1, theta, max(-1.0, theta - delta), min(1.0, theta + epsilon), True,
                      fixed, broken, mcnemar_exact(fixed, broken))


def unpaired_difference(k_a: int, n_a: int, k_b: int, n_b: int, z: float = Z95) -> Difference | None:
    """acc(b) - acc(a) for independent samples (Newcombe's hybrid score interval); None if either is empty."""
    if n_a <= 0 or n_b <= 0:
        return None
    pa, pb = k_a / n_a, k_b / n_b
    la, ua = wilson(k_a, n_a, z)
    lb, ub = wilson(k_b, n_b, z)
    theta = pb - pa
    delta = math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
    epsilon = math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
    return Difference(min(n_a, n_b), pa, pb, theta, max(-1.0, theta - delta), min(1.0, theta + epsilon), False)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def calibration_bins(scores: list[float], labels: list[bool], bins: int = 10) -> list[dict[str, float]]:
    """Reliability-diagram bins over [0, 1]: each non-empty bin's mean score, accuracy and count."""
    out = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(s, y) for s, y in zip(scores, labels, strict=True)
                   if low <= s < high or (b == bins - 1 and s == 1.0)]
        if members:
            out.append({"low": low, "high": high, "n": len(members),
                        "mean_score": sum(s for s, _ in members) / len(members),
                        "accuracy": sum(1 for _, y in members if y) / len(members)})
    return out
