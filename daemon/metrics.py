"""Prometheus metrics, read from the database at scrape time.

Every stage already records its state and an audit event in the database, so
the metrics are derived there instead of from counters threaded through the
stages: they survive restarts, and they cover `secondreader worker`
processes as well as `serve`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from daemon.config import Config
from daemon.liveness import gone_after
from daemon.stages.monitor.drift import VARIABLES, latest_period_start
from db.audit import event_counts
from db.drift import alerts, new_value_counts
from db.drift import versions as drift_versions
from db.governance import versions
from db.liveness import no_worker_alert, processes
from db.models import utcnow
from db.retention import files_removed_count
from db.session import Database
from db.stage_times import STAGES, decision_counts, stage_durations
from db.studies import pipeline_counts

log = logging.getLogger(__name__)


class DatabaseCollector(Collector):
    def __init__(
        self,
        db: Database,
        storage: Callable[[], dict[str, float | bool]] | None = None,
        config: Config | None = None,
        audit_waiting: Callable[[], int] | None = None,
    ) -> None:
        self.db = db
        self.storage = storage  # daemon/cleaner.Cleaner.storage_state
        self.config = config
        # daemon/stages/receive/audit_backlog.AuditBacklog.waiting: held in this process, so
        # it is reported when the database is not (that is when it grows).
        self.audit_waiting = audit_waiting

    def collect(self) -> Iterator[Any]:
        if self.audit_waiting is not None:
            yield GaugeMetricFamily(
                "secondreader_audit_waiting",
                "Audit rows of the receive path waiting for the database (written when it is back)",
                value=self.audit_waiting(),
            )
        up = GaugeMetricFamily("secondreader_database_up", "1 if the database answered")
        try:
            with self.db.session() as s:
                counts = pipeline_counts(s)
                events = event_counts(s)
                removed = files_removed_count(s)
                durations = stage_durations(s)
                decisions = decision_counts(s)
                liveness = self._liveness(s)
                default = (self.config or Config()).monitoring.default_mode
                model_versions = versions(s, default)
                drift = self._drift(s)
        except Exception:
            log.exception("metrics: database query failed")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        helps = {
            "studies": "Studies by state (receiving, complete)",
            "jobs": "Analysis jobs by state; queued is the queue depth",
            "reports": "Analysis runs by report state",
            "outbox": "SR/SEG deliveries by state; dead are dead letters",
        }
        for name, by_state in counts.items():
            family = GaugeMetricFamily(f"secondreader_{name}", helps[name], labels=["state"])
            for state, n in sorted(by_state.items()):
                family.add_metric([state], n)
            yield family
        audit = CounterMetricFamily(
            "secondreader_audit_events",
            "Audit events by type: associations, instances, studies, jobs, deliveries",
            labels=["event_type"],
        )
        for event_type, n in sorted(events.items()):
            audit.add_metric([event_type], n)
        yield audit
        for stage in STAGES:
            yield _histogram(
                f"secondreader_stage_{stage}_seconds",
                f"Seconds of the {stage.replace('_', ' ')} stage (from the database's timestamps)",
                durations[stage],
            )
        review = CounterMetricFamily(
            "secondreader_review_decisions",
            "Physicians' decisions on AI findings, by model version and decision",
            labels=["model", "version", "decision"],
        )
        for (model, version, decision), n in sorted(decisions.items()):
            review.add_metric([model, version, decision], n)
        yield review
        modes = GaugeMetricFamily(
            "secondreader_model_mode",
            "1 for each model version's current mode (silent, review-only, live)",
            labels=["model", "version", "mode"],
        )
        for v in model_versions:
            modes.add_metric([v.model_name, v.model_version, v.mode], 1)
        yield modes
        yield from liveness
        yield from drift
        yield GaugeMetricFamily(
            "secondreader_studies_files_removed",
            "Studies whose files retention removed (their rows stay)",
            value=removed,
        )
        if self.storage is not None:
            disk = self.storage()
            yield GaugeMetricFamily(
                "secondreader_disk_used_ratio",
                "Used fraction of the disk holding the state folder",
                value=float(disk["used_percent"]) / 100.0,
            )
            yield GaugeMetricFamily(
                "secondreader_retention_blocked",
                "1 when the disk is above the high watermark and nothing may be removed",
                value=1.0 if disk["blocked"] else 0.0,
            )

    def _drift(self, s: Any) -> list[Any]:
        """Drift alerts of each version's latest complete period, and new scanner values.

        From the monitor stage's audit rows (daemon/stages/monitor/watch.py):
        a period alerts here once the drift job has reported it.
        """
        settings = (self.config or Config()).monitoring
        now = utcnow()
        raised = {(a.get("model"), a.get("version"), a.get("start")): a.get("variables") or {}
                  for a in alerts(s)}  # fmt: skip
        alert = GaugeMetricFamily(
            "secondreader_drift_alert",
            "1 when a variable drifted from the baseline in the model version's latest complete "
            "period (PSI above monitoring.psi_bound and significant)",
            labels=["model", "version", "variable"],
        )
        for model, version, first in drift_versions(s):
            start = latest_period_start(first, settings, now)
            latest = raised.get((model, version, start.isoformat() if start else None), {})
            for variable in VARIABLES:
                alert.add_metric([model, version, variable], 1.0 if variable in latest else 0.0)
        new = CounterMetricFamily(
            "secondreader_drift_new_values",
            "Scanner values (manufacturer, model, kernel) never seen in the version's baseline",
            labels=["model", "version"],
        )
        for (model, version), n in sorted(new_value_counts(s).items()):
            new.add_metric([model, version], n)
        return [alert, new]

    def _liveness(self, s: Any) -> list[Any]:
        """Each process's liveness (the last day's), and the no-live-worker alert."""
        config = self.config or Config()  # the defaults, where none was given
        alert_after = config.worker.no_worker_alert_seconds
        limit, now = gone_after(config), utcnow()
        up = GaugeMetricFamily("secondreader_process_up",
                               "1 while a process (serve, receiver, worker) beats",
                               labels=["kind", "name"])  # fmt: skip
        for p in processes(s, now - timedelta(days=1)):
            up.add_metric([p.kind, p.name], 1.0 if p.alive(now, limit) else 0.0)
        alert = no_worker_alert(s, limit=limit, alert_after=timedelta(seconds=alert_after))
        missing = GaugeMetricFamily(
            "secondreader_worker_missing",
            "1 when jobs wait past worker.no_worker_alert_seconds and no worker is alive",
            value=0.0 if alert is None else 1.0,
        )
        return [up, missing]


# Seconds: from a fast hand-off to a slow study, a quiet window to an hour.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


def _histogram(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    counts = [sum(1 for v in values if v <= bound) for bound in BUCKETS]
    buckets = [(str(bound), n) for bound, n in zip(BUCKETS, counts, strict=True)]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=sum(values))


def serve_metrics(
    db: Database,
    host: str,
    port: int,
    storage: Callable[[], dict[str, float | bool]] | None = None,
    healthy: Callable[[], bool] = lambda: True,
    config: Config | None = None,
    audit_waiting: Callable[[], int] | None = None,
) -> Any:
    """Start /metrics and /healthz in a thread; returns the server (call .shutdown()).

    /healthz means what the web page's does (200 or 503), so a load balancer
    can watch this port; any other path is 404.
    """
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(db, storage, config, audit_waiting))
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            ok = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])  # fmt: skip
            return [b"ok\n" if ok else b"unhealthy\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: this port serves /metrics and /healthz\n"]

    server_class = _Server6 if ":" in host else _Server  # an IPv6 address, e.g. "::"
    server = make_server(host, port, app, server_class, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics (and /healthz)", host, server.server_port)
    return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass  # no request lines in the log
