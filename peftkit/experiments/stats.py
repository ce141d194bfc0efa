"""Mean and 95% confidence interval over a method's seeds: mean ± t_{0.975, n-1} * s / sqrt(n),
with s the sample standard deviation (Student's t, since n is small)."""

from __future__ import annotations

import math

# t_{0.975, df} for df = 1..30 (any statistics table; scipy.stats.t.ppf(0.975, df)).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom; past the table, the
    Cornish-Fisher expansion around the normal quantile (error below 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError("a t quantile needs df >= 1")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: list[float]) -> dict:
    """{"mean", "half_width", "low", "high", "n"} of `values`; one value has no interval
    (half_width None)."""
    n = len(values)
    mean = sum(values) / n
    half = None
    if n > 1:
        s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t975(n - 1) * s / math.sqrt(n)
    return {"mean": mean, "half_width": half, "n": n,
            "low": None if half is None else mean - half,
            "high": None if half is None else mean + half}
