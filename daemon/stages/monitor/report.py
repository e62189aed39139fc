"""The AI committee's report (PDF, beside the web page's HTML) and the registry export.

The PDF is drawn with matplotlib (already a dependency for the web page's
plots): text pages with the figures and one page of subgroup intervals. No
browser or LaTeX on the server. The export follows the ACR Assess-AI data
categories: image metadata, AI result, review decision, and demographics
reduced to sex and age band (db/monitoring.py `registry_rows` chooses every
column; nothing identifying is among them).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from daemon.stages.monitor.governance import MonitoringReport  # noqa: E402
from daemon.stages.monitor.performance import Interval, Performance  # noqa: E402
from db.monitoring import ACQUISITION  # noqa: E402

# The export's columns by ACR Assess-AI data category, in order.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "image_metadata": ("analysed_week", *ACQUISITION),
    "ai_result": ("model_name", "model_version", "model_mode", "finding", "finding_code",
                  "probability", "threshold", "ai_present"),
    "review": ("review_selection", "review_decision"),
    "demographics": ("patient_sex", "patient_age_band"),
}  # fmt: skip
EXPORT_COLUMNS = tuple(column for columns in CATEGORIES.values() for column in columns)


def export_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")  # fmt: skip
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in EXPORT_COLUMNS})
    return out.getvalue()


def export_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(
        {
            "format": "secondreader registry export, ACR Assess-AI data categories",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "categories": {name: list(columns) for name, columns in CATEGORIES.items()},
            "records": [{k: row.get(k) for k in EXPORT_COLUMNS} for row in rows],
        },
        indent=1,
    )


def figure_lines(p: Performance) -> list[str]:
    """The figures of one version or group, as the CLI and the PDF print them."""
    return [
        f"AI-positive findings {p.n_positive}, decided {p.positive_decided}",
        f"AI-negative findings {p.n_negative}, drawn for review {p.negative_drawn}, "
        f"decided {p.negative_decided}",
        f"PPV          {p.ppv.text()}",
        f"Sensitivity  {p.sensitivity.text()}",
        f"NPV          {p.npv.text()}",
        f"Agreement    {p.agreement.text()}",
    ]


def report_lines(report: MonitoringReport) -> list[str]:
    ev = report.evidence
    v = ev.version
    start, end = report.since or v.first_run, report.until or datetime.now(UTC)
    period = f"{_day(start) or '-'} to {_day(end)}"
    outcomes = ", ".join(f"{k} {n}" for k, n in sorted(report.operational["outcomes"].items()))
    median, p95 = report.turnaround_median, report.turnaround_p95
    lines = [
        f"Model {v.model_name} {v.model_version}: mode {v.mode}"
        + ("" if v.mode_set else " (the site's default)"),
        f"Period: {period}",
        f"Runs: {outcomes or 'none'}; silent runs {v.withheld}",
        "Turnaround (queued to result): "
        + (f"median {median:.1f} s, 95th percentile {p95:.1f} s" if median is not None
           and p95 is not None else "none yet"),  # fmt: skip
        "",
        *figure_lines(ev.performance),
        "Intervals: 95 % Wilson; sensitivity from PPV and NPV at 97.5 % each.",
    ]
    for other, c in ev.side_by_side.items():
        kappa = "n/a" if c.kappa is None else f"{c.kappa:.2f}"
        lines.append(f"Side by side with {other}: {c.n} findings, agreement "
                     f"{c.agreement.text()}, kappa {kappa}")  # fmt: skip
    lines.append("")
    lines.append("Subgroups (decided findings; * = too few to say):")
    for sub in report.subgroups:
        for g in sub.groups:
            mark = "*" if g.too_few else " "
            lines.append(f" {mark} {sub.variable:<16} {g.group[:18]:<18} n={g.decided:<4} "
                         f"PPV {g.ppv.text():<18} sens {g.sensitivity.text():<18} "
                         f"agree {g.agreement.text()}")  # fmt: skip
    lines.append("")
    lines.extend(drift_lines(report))
    lines.append("")
    lines.append("Mode changes:")
    for h in report.history or []:
        lines.append(f"  {h.changed_at:%Y-%m-%d %H:%M} {h.mode} by {h.changed_by}: {h.reason}")
    if not report.history:
        lines.append(f"  none (the site's default mode: {v.mode})")
    return lines


def drift_lines(report: MonitoringReport) -> list[str]:
    """What drifted: the baseline, each compared period's alerts, the new scanner values."""
    drift = report.drift
    if drift is None:
        return ["Drift: no observation yet."]
    lines = [f"Drift: baseline {_day(drift.baseline_start)} to {_day(drift.baseline_end)}, "
             f"{drift.baseline_n} runs" + ("" if drift.ready else " (still forming: nothing "
             "compared yet)")]  # fmt: skip
    for period in drift.periods:
        if not period.enough:
            state = "too few runs to say"
        else:
            state = "ALERT: " + ", ".join(period.alerting) if period.alerting else "no alert"
        lines.append(f"  {_day(period.start)} to {_day(period.end)}: {period.n} runs, {state}")
    for value in drift.new_values:
        lines.append(f"  new {value.variable.replace('_', ' ')} {value.value!r}, first seen "
                     f"{_day(value.first_seen)}")  # fmt: skip
    return lines


def _day(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%d") if when else None


def pdf(report: MonitoringReport) -> bytes:
    """The report as a PDF: the figures, then the subgroups' intervals as a plot."""
    lines = report_lines(report)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": "secondreader model monitoring report"}) as out:
        per_page = 52
        for start in range(0, len(lines), per_page):
            fig = plt.figure(figsize=(8.27, 11.69))  # A4
            if start == 0:
                fig.text(0.06, 0.965, "Model monitoring report", fontsize=15, weight="bold")
            fig.text(0.06, 0.94, "\n".join(lines[start:start + per_page]), va="top",
                     family="monospace", fontsize=7.2)  # fmt: skip
            out.savefig(fig)
            plt.close(fig)
        out.savefig(_subgroup_figure(report))
        plt.close("all")
    return buf.getvalue()


def _subgroup_figure(report: MonitoringReport) -> Any:
    groups = [(sub.variable, g) for sub in report.subgroups for g in sub.groups]
    fig, axes = plt.subplots(1, 2, figsize=(8.27, max(3.0, 0.28 * len(groups) + 1.5)),
                             sharey=True)  # fmt: skip
    names = [f"{var}: {g.group}" + (" *" if g.too_few else "") for var, g in groups]
    for ax, title, pick in (
        (axes[0], "PPV", lambda g: g.ppv),
        (axes[1], "Sensitivity", lambda g: g.sensitivity),
    ):
        for y, (_, g) in enumerate(groups):
            interval: Interval = pick(g)
            if interval.estimate is None or interval.low is None or interval.high is None:
                continue
            below = max(0.0, interval.estimate - interval.low)  # rounding: never negative
            above = max(0.0, interval.high - interval.estimate)
            ax.errorbar(interval.estimate, y, xerr=[[below], [above]], fmt="o",
                        color="grey" if g.too_few else "C0")  # fmt: skip
        ax.set_title(f"{title} (95 % interval)")
        ax.set_xlim(0, 1)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("Subgroups (* too few decisions to say anything)")
    fig.tight_layout()
    return fig
