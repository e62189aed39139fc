"""Drift: each period of a model version's observations against its baseline.

The baseline is the version's first `baseline_days` of observations (at
least `min_baseline_runs`, else nothing is compared: too few to say). Then
come consecutive `period_days` windows; a complete window with at least
`min_period_runs` runs is compared variable by variable.

Which test for which variable:
- numeric acquisition values, image statistics and the score: PSI over the
  baseline's deciles, and the two-sample KS test. KS compares whole
  distributions without bins; it suits continuous values (its p-value is
  conservative where values tie, as kVp does).
- categorical values (scanner, kernel, contrast, modality, body part, the
  positive call): PSI over the values, and chi-square on the counts. KS has
  no meaning without an order.

The alert rule: a variable alerts when its PSI exceeds `psi_bound` (the
shift is large enough to matter) AND its p-value is below `ks_alpha`
divided by the number of variables tested in the period (Bonferroni: some
15 tests a week would otherwise give a false alarm every few weeks). PSI
alone alarms on small samples' noise; the p-value alone on trivial shifts
between large samples.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from daemon.config import MonitoringConfig
from daemon.stages.monitor.statistics import chi2_2samp, ks_2samp, psi_categorical, psi_numeric

NUMERIC = (
    "slice_thickness", "kvp", "pixel_spacing", "p01", "p50", "p99", "noise", "score",
)  # fmt: skip
CATEGORICAL = (
    "modality", "body_part", "manufacturer", "manufacturer_model", "kernel", "contrast",
    "positive",
)  # fmt: skip
VARIABLES = NUMERIC + CATEGORICAL
# Header values whose first appearance after the baseline is reported at once: a new scanner.
SCANNER = ("manufacturer", "manufacturer_model", "kernel")
# Fewer values than this in either sample (a header most scanners omit): not tested.
MIN_VALUES = 5
ABSENT = "(absent)"

Row = Mapping[str, Any]


@dataclass(frozen=True)
class VariableDrift:
    variable: str
    test: str  # "ks" or "chi2"
    statistic: float  # KS's D, or chi-square
    p_value: float
    psi: float
    alert: bool


@dataclass(frozen=True)
class NewValue:
    variable: str
    value: str
    first_seen: datetime


@dataclass(frozen=True)
class PeriodDrift:
    model: str
    version: str
    start: datetime
    end: datetime
    n: int
    variables: tuple[VariableDrift, ...]
    new_values: tuple[NewValue, ...]  # values first seen in this period

    @property
    def enough(self) -> bool:
        """False: too few runs to say (nothing was tested)."""
        return bool(self.variables)

    @property
    def alerting(self) -> list[str]:
        return [v.variable for v in self.variables if v.alert]


@dataclass(frozen=True)
class DriftReport:
    model: str
    version: str
    baseline_start: datetime
    baseline_end: datetime
    baseline_n: int
    ready: bool  # the baseline is over and large enough: periods are compared
    periods: tuple[PeriodDrift, ...]  # complete periods, oldest first
    new_values: tuple[NewValue, ...]  # every value first seen after the baseline

    @property
    def latest(self) -> PeriodDrift | None:
        return self.periods[-1] if self.periods else None


def _numbers(rows: Sequence[Row], variable: str) -> list[float]:
    return [float(r[variable]) for r in rows if r.get(variable) is not None]


def _labels(rows: Sequence[Row], variable: str) -> list[str]:
    # Absent is a value here: a scanner that stops sending the kernel has changed too.
    return [ABSENT if r.get(variable) is None else str(r[variable]) for r in rows]


def compare(
    baseline: Sequence[Row], current: Sequence[Row], settings: MonitoringConfig
) -> tuple[VariableDrift, ...]:
    """Every variable with enough values in both samples, tested and judged by the rule above."""
    raw: list[tuple[str, str, float, float, float]] = []
    for variable in NUMERIC:
        b, c = _numbers(baseline, variable), _numbers(current, variable)
        if len(b) >= MIN_VALUES and len(c) >= MIN_VALUES:
            d, p = ks_2samp(b, c)
            raw.append((variable, "ks", d, p, psi_numeric(b, c)))
    for variable in CATEGORICAL:
        lb, lc = _labels(baseline, variable), _labels(current, variable)
        stat, p = chi2_2samp(lb, lc)
        raw.append((variable, "chi2", stat, p, psi_categorical(lb, lc)))
    corrected = settings.ks_alpha / max(1, len(raw))
    return tuple(
        VariableDrift(name, test, stat, p, psi, psi > settings.psi_bound and p < corrected)
        for name, test, stat, p, psi in raw
    )


def first_seen(rows: Sequence[Row], baseline_end: datetime) -> tuple[NewValue, ...]:
    """Scanner values absent from the baseline, each with its first observation after it."""
    known = {(v, str(r.get(v))) for r in rows if r["analysed_at"] < baseline_end for v in SCANNER}
    found: dict[tuple[str, str], datetime] = {}
    for r in rows:
        if r["analysed_at"] < baseline_end:
            continue
        for v in SCANNER:
            if r.get(v) is None:
                continue
            key = (v, str(r[v]))
            if key not in known and key not in found:
                found[key] = r["analysed_at"]
    return tuple(NewValue(v, value, at) for (v, value), at in found.items())


def latest_period_start(
    first: datetime, settings: MonitoringConfig, now: datetime
) -> datetime | None:
    """The start of the version's latest complete period (None before the first one ends)."""
    end = first + timedelta(days=settings.baseline_days)
    complete = int((now - end) / timedelta(days=settings.period_days))
    return end + (complete - 1) * timedelta(days=settings.period_days) if complete >= 1 else None


def drift_report(
    rows: Sequence[Row], model: str, version: str, settings: MonitoringConfig, now: datetime
) -> DriftReport | None:
    """The version's baseline and complete periods; None without observations.

    `rows` are one version's observations in time order (db/monitoring.observations).
    """
    if not rows:
        return None
    start = min(r["analysed_at"] for r in rows)
    end = start + timedelta(days=settings.baseline_days)
    baseline = [r for r in rows if r["analysed_at"] < end]
    if now < end or len(baseline) < settings.min_baseline_runs:
        # Still collecting, or too few to be a baseline: nothing to compare with.
        return DriftReport(model, version, start, end, len(baseline), False, (), ())
    new = first_seen(rows, end)
    step = timedelta(days=settings.period_days)
    times = [r["analysed_at"] for r in rows]
    periods = []
    at = end
    while at + step <= now:
        window = rows[bisect_left(times, at) : bisect_left(times, at + step)]
        enough = len(window) >= settings.min_period_runs
        tested = compare(baseline, window, settings) if enough else ()
        mine = tuple(v for v in new if at <= v.first_seen < at + step)
        periods.append(PeriodDrift(model, version, at, at + step, len(window), tested, mine))
        at += step
    return DriftReport(model, version, start, end, len(baseline), True, tuple(periods), new)
