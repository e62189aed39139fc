"""serve's monitor jobs: a new scanner at once, drift once per period.

`Monitor.new_values` runs when the worker records a run (serve wakes the
"monitor" job, as it wakes the report stage) and on its interval: a
manufacturer, scanner model or kernel a version's baseline never saw is
reported within seconds of its first run, not at the next weekly check.
`Monitor.drift` runs every `monitoring.drift_interval_seconds`: each
complete period that alerts is reported once.

Reported means one WARNING line (scanner and kernel names, never a patient
attribute), one audit row, and the metrics (daemon/metrics.py reads the
rows). The audit rows are also the memory of what was reported.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from daemon.config import MonitoringConfig
from daemon.stages.monitor.drift import SCANNER, DriftReport, NewValue, drift_report
from db.drift import (
    alerts,
    count_before,
    first_seen_values,
    record_alert,
    record_new_value,
    reported_new_values,
    versions,
)
from db.models import utcnow
from db.monitoring import observations
from db.session import Database

log = logging.getLogger(__name__)


def _day(at: datetime) -> str:
    return at.strftime("%Y-%m-%d")


class Monitor:
    def __init__(self, db: Database, settings: MonitoringConfig) -> None:
        self.db = db
        self.settings = settings
        self.least = settings.min_baseline_runs

    def run_once(self) -> None:
        """The "monitor" job: new scanner values (cheap: grouped counts)."""
        self.new_values()

    def new_values(self, now: datetime | None = None) -> list[tuple[str, str, NewValue]]:
        """Report each scanner value first seen after its version's baseline; returns them."""
        now = now or utcnow()
        found: list[tuple[str, str, NewValue]] = []
        with self.db.session() as s:
            done = reported_new_values(s)
            for model, version, first in versions(s):
                end = first + timedelta(days=self.settings.baseline_days)
                small = now >= end and count_before(s, model, version, end) < self.least
                if now < end or small:
                    continue  # no baseline yet: nothing is new
                for variable in SCANNER:
                    for value, seen in first_seen_values(s, model, version, variable):
                        if seen >= end and (model, version, variable, value) not in done:
                            record_new_value(s, model, version, variable, value, seen)
                            found.append((model, version, NewValue(variable, value, seen)))
        for model, version, new in found:  # once the rows are committed
            log.warning(
                # The value in brackets: quoted values are scrubbed from the log (daemon/logs.py).
                "drift: model %s %s: new %s [%s] first seen %s, never in its baseline",
                model, version, new.variable.replace("_", " "), new.value,
                new.first_seen.strftime("%Y-%m-%d %H:%M"),
            )  # fmt: skip
        return found

    def reports(self, now: datetime | None = None) -> list[DriftReport]:
        """Every version's drift report (the web page and the CLI show one each)."""
        now = now or utcnow()
        out = []
        for model, version in self.known_versions():
            report = self.report(model, version, now)
            if report is not None:
                out.append(report)
        return out

    def known_versions(self) -> list[tuple[str, str]]:
        with self.db.session() as s:
            return [(m, v) for m, v, _ in versions(s)]

    def report(self, model: str, version: str, now: datetime | None = None) -> DriftReport | None:
        with self.db.session() as s:
            rows = observations(s, model_name=model, model_version=version)
        return drift_report(rows, model, version, self.settings, now or utcnow())

    def drift(self, now: datetime | None = None) -> list[DriftReport]:
        """The drift job: every alerting period not yet reported, reported once."""
        reports = self.reports(now)
        with self.db.session() as s:
            done = {(a.get("model"), a.get("version"), a.get("start")) for a in alerts(s)}
            raised = []
            for report in reports:
                for period in report.periods:
                    key = (report.model, report.version, period.start.isoformat())
                    if not period.alerting or key in done:
                        continue
                    variables = {
                        v.variable: {"test": v.test, "psi": round(v.psi, 4),
                                     "p": float(f"{v.p_value:.3g}")}
                        for v in period.variables if v.alert
                    }  # fmt: skip
                    record_alert(s, report.model, report.version, period.start, period.end,
                                 period.n, variables)  # fmt: skip
                    raised.append(period)
        for period in raised:
            log.warning(
                "drift: model %s %s: period %s to %s (%d runs) drifted from its baseline: %s",
                period.model, period.version, _day(period.start), _day(period.end), period.n,
                ", ".join(period.alerting),
            )  # fmt: skip
        return reports
