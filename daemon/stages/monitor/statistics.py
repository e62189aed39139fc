"""The drift tests, in numpy alone (no scipy in this project).

- Population stability index (PSI): how far a period's distribution moved
  from the baseline's, as a size independent of the sample sizes. Numeric
  variables are binned at the baseline's deciles, categorical ones by value.
- Two-sample Kolmogorov-Smirnov: is a continuous variable's shift more than
  sampling noise? The asymptotic p-value from the Kolmogorov series.
- Chi-square on the baseline-against-period table of counts: the same
  question for a categorical variable.

PSI alone is no test: two samples of the same distribution in k bins have a
PSI of about (k - 1)(1/n + 1/m), 0.75 for ten bins, 30 baseline runs and 20
in a week. The p-values alone are no size: a year's baseline against a busy
week finds a 1 HU shift "significant". drift.py asks for both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

# Stands in for an empty bin's share: ln(0) has no value. Small, so that a
# category the baseline never had (a new scanner) weighs heavily.
EPSILON = 1e-4
DECILES = np.linspace(0.1, 0.9, 9)


def _shares(counts: np.ndarray) -> np.ndarray:
    total = float(counts.sum())
    shares = counts / total if total else np.zeros_like(counts, dtype=np.float64)
    return np.where(shares > 0, shares, EPSILON)


def _psi(baseline_counts: np.ndarray, current_counts: np.ndarray) -> float:
    b = _shares(baseline_counts.astype(np.float64))
    c = _shares(current_counts.astype(np.float64))
    return float(np.sum((c - b) * np.log(c / b)))


def numeric_bins(baseline: np.ndarray) -> np.ndarray:
    """The inner bin edges: the baseline's distinct deciles (ties merge bins: kVp is 100 or 120)."""
    return np.unique(np.quantile(baseline, DECILES))


def numeric_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # A value on an edge goes to the bin above it, for baseline and period alike.
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)


def psi_numeric(baseline: Sequence[float], current: Sequence[float]) -> float:
    """PSI over the baseline's decile bins (open at both ends)."""
    b, c = np.asarray(baseline, dtype=np.float64), np.asarray(current, dtype=np.float64)
    edges = numeric_bins(b)
    return _psi(numeric_counts(b, edges), numeric_counts(c, edges))


def category_counts(
    baseline: Sequence[str], current: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The categories of both samples (baseline's first) and each sample's counts."""
    cb, cc = Counter(baseline), Counter(current)
    names = sorted(cb) + sorted(set(cc) - set(cb))
    return (
        names,
        np.array([cb[n] for n in names], dtype=np.float64),
        np.array([cc[n] for n in names], dtype=np.float64),
    )


def psi_categorical(baseline: Sequence[str], current: Sequence[str]) -> float:
    """PSI over the values of both samples; a value the baseline never had counts EPSILON there."""
    _, b, c = category_counts(baseline, current)
    return _psi(b, c)


def kolmogorov_q(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: 2 sum (-1)^(j-1) exp(-2 j^2 lam^2).

    That alternating series converges slowly for small lam; there the
    equivalent Jacobi form 1 - sqrt(2 pi)/lam sum exp(-(2j-1)^2 pi^2 / (8 lam^2))
    converges in a few terms.
    """
    if lam <= 0:
        return 1.0
    if lam < 1.18:
        total = sum(
            math.exp(-((2 * j - 1) ** 2) * math.pi**2 / (8 * lam * lam)) for j in range(1, 6)
        )
        return min(1.0, max(0.0, 1.0 - math.sqrt(2 * math.pi) / lam * total))
    total = sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return min(1.0, max(0.0, 2.0 * total))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p): the largest gap between the two empirical CDFs and its asymptotic p-value.

    p uses Stephens' small-sample correction of the effective size,
    (sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) D with ne = n m / (n + m). With ties
    (kVp, slice thickness) the p-value is conservative: an alert is rarer, not
    more frequent.
    """
    x, y = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        return 0.0, 1.0
    pooled = np.concatenate([x, y])
    gap = np.abs(
        np.searchsorted(x, pooled, side="right") / n - np.searchsorted(y, pooled, side="right") / m
    )
    d = float(gap.max())
    root = math.sqrt(n * m / (n + m))
    return d, kolmogorov_q((root + 0.12 + 0.11 / root) * d)


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for chi-square with `df` degrees of freedom: Q(df/2, x/2), the upper gamma."""
    if x <= 0 or df <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # the series of P(a, z) converges here
        term = total = 1.0 / a
        k = a
        for _ in range(500):
            k += 1
            term *= z / k
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_front)))
    # Q(a, z) by its continued fraction (modified Lentz), as in Numerical Recipes.
    tiny = 1e-300
    bb = z + 1 - a
    c, d = 1.0 / tiny, 1.0 / bb
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        bb += 2
        d = an * d + bb
        d = tiny if abs(d) < tiny else d
        c = bb + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_front) * h))


def chi2_2samp(baseline: Sequence[str], current: Sequence[str]) -> tuple[float, float]:
    """(chi-square, p) of the 2 x k table of counts: do the two samples share one distribution?"""
    _, b, c = category_counts(baseline, current)
    if b.size < 2 or b.sum() == 0 or c.sum() == 0:
        return 0.0, 1.0
    table = np.vstack([b, c])
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    return stat, chi2_sf(stat, b.size - 1)
