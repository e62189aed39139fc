"""The drift page's plots: one per variable, the baseline against each period.

Left, the distributions: for a numeric variable the empirical CDFs (the
baseline in black, the periods from light to dark, an alerting period in
red); for a categorical one each value's share, baseline first. Right, the
period's PSI against `monitoring.psi_bound`.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daemon.stages.monitor.drift import ABSENT, NUMERIC, DriftReport

Row = Mapping[str, Any]


def _values(rows: Sequence[Row], variable: str) -> list[Any]:
    if variable in NUMERIC:
        return sorted(float(r[variable]) for r in rows if r.get(variable) is not None)
    return [ABSENT if r.get(variable) is None else str(r[variable]) for r in rows]


def drift_plot(rows: Sequence[Row], report: DriftReport, variable: str, bound: float) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe

    baseline = [r for r in rows if r["analysed_at"] < report.baseline_end]
    periods = [
        (p, [r for r in rows if p.start <= r["analysed_at"] < p.end]) for p in report.periods
    ]
    figure = Figure(figsize=(9, 3.2), dpi=90)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    samples = [("baseline", _values(baseline, variable), False)] + [
        (f"{p.start:%m-%d}", _values(mine, variable), variable in p.alerting) for p, mine in periods
    ]
    if variable in NUMERIC:
        shades = np.linspace(0.3, 0.9, max(1, len(samples) - 1))
        for k, (label, values, alert) in enumerate(samples):
            if not values:
                continue
            y = np.arange(1, len(values) + 1) / len(values)
            colour = "black" if k == 0 else ("tab:red" if alert else (0.1, 0.3, shades[k - 1]))
            left.step(values, y, where="post", color=colour, lw=2 if k == 0 else 1, label=label)
        left.set_ylabel("cumulative share")
    else:
        names = sorted({v for _, values, _ in samples for v in values})
        bottom = np.zeros(len(samples))
        for name in names:
            shares = np.array([Counter(v)[name] / len(v) if v else 0.0 for _, v, _ in samples])
            left.bar(range(len(samples)), shares, bottom=bottom, label=name[:20])
            bottom += shares
        left.set_xticks(range(len(samples)), [s[0] for s in samples], rotation=45, fontsize=7)
        left.set_ylabel("share")
    left.set_title(variable.replace("_", " "))
    left.legend(fontsize="x-small", loc="best")
    tested = [(p, next((v for v in p.variables if v.variable == variable), None))
              for p in report.periods]  # fmt: skip
    labels = [f"{p.start:%m-%d}" for p, _ in tested]
    psi = [v.psi if v is not None else float("nan") for _, v in tested]
    right.plot(labels, psi, marker="o")
    alerts = [(x, y) for x, y, (_, v) in zip(labels, psi, tested, strict=True) if v and v.alert]
    if alerts:  # the alerting periods in red
        right.scatter(*zip(*alerts, strict=True), color="tab:red", zorder=3)
    right.axhline(bound, color="tab:red", ls="--", lw=1)
    right.set_title("PSI by period (dashed: the bound)")
    right.tick_params(axis="x", labelrotation=45, labelsize=7)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
