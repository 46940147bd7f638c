"""Small, dependency-free statistics for study reports: quartiles, rank correlation, a rank-sum test.

Rank-based on purpose: probe accuracies of a random search are skewed and bounded, a few diverged trials
sit far from the rest, and ranks need no assumption about either.
"""

from __future__ import annotations

import math


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linear interpolation between order statistics."""
    xs = sorted(values)

    def at(q: float) -> float:
        position = q * (len(xs) - 1)
        low = math.floor(position)
        high = min(low + 1, len(xs) - 1)
        return xs[low] + (xs[high] - xs[low]) * (position - low)

    return at(0.25), at(0.5), at(0.75)


def ranks(values: list[float]) -> list[float]:
    """0-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2
        i = j + 1
    return result


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or no spread."""
    if len(pairs) < 3:
        return None
    xs, ys = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx, sy = math.sqrt(sum((x - mx) ** 2 for x in xs)), math.sqrt(sum((y - my) ** 2 for y in ys))
    return cov / (sx * sy) if sx and sy else None


def spearman_p(rho: float, n: int) -> float:
    """Two-sided p-value of rho under no association (t approximation, normal tail; fine for n >= 10)."""
    if n < 4 or abs(rho) >= 1:
        return 0.0 if abs(rho) >= 1 and n >= 4 else 1.0
    t = rho * math.sqrt((n - 2) / (1 - rho * rho))
    return math.erfc(abs(t) / math.sqrt(2))


def rank_sum_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test (normal approximation with tie correction)."""
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        return 1.0
    pooled = a + b
    r = ranks(pooled)
    u = sum(r[:n1]) + n1 - n1 * (n1 + 1) / 2  # ranks() is 0-based
    n = n1 + n2
    ties = {}
    for v in pooled:
        ties[v] = ties.get(v, 0) + 1
    tie_term = sum(t ** 3 - t for t in ties.values()) / (n * (n - 1)) if n > 1 else 0.0
    variance = n1 * n2 / 12 * ((n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))
