"""Confidence intervals of proportions: what a sensitivity of 19/20 does and does not say.

The Wilson score interval (Wilson 1927) keeps its coverage near 95 % for the
small counts of a test set or a month of reviews, where the textbook normal
interval is too narrow and can leave [0, 1]: 19/20 is 0.95 (0.76 to 0.99).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95 %


@dataclass(frozen=True)
class Interval:
    estimate: float | None
    low: float | None
    high: float | None
    numerator: float
    denominator: float

    def text(self) -> str:
        if self.estimate is None or self.low is None or self.high is None:
            return "n/a"
        return f"{self.estimate:.0%} ({self.low:.0%}-{self.high:.0%})".replace("%", " %")


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of a proportion."""
    if n <= 0:
        return Interval(None, None, None, successes, n)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), successes, n)
