"""A model version's monitoring report, its mode and the registry export (admins only).

The page is the committee's report as HTML (the PDF beside it holds the
same figures); its form changes the version's mode, with a reason, from
the version's next result on. The export leaves with the columns
db/monitoring.py `registry_rows` chooses, and who took it is audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, url_for

from daemon.stages.monitor.governance import GovernanceError, MonitoringReport
from daemon.stages.monitor.report import export_csv, export_json, pdf, report_lines
from daemon.web import admin_required
from daemon.web.site import site
from db.governance import MODES
from db.monitoring import record_export, registry_rows

bp = Blueprint("monitoring", __name__, url_prefix="/admin/monitoring")


def _period() -> tuple[datetime | None, datetime | None]:
    try:
        since = request.args.get("since")
        until = request.args.get("until")
        return (datetime.fromisoformat(since) if since else None,
                datetime.fromisoformat(until) if until else None)  # fmt: skip
    except ValueError:
        abort(400, "The period: dates as YYYY-MM-DD.")


def _report(name: str, version: str) -> MonitoringReport:
    since, until = _period()
    try:
        return site().governance.report(name, version, since=since, until=until)
    except GovernanceError as exc:
        abort(404, str(exc))


@bp.get("/<name>/<version>")
@admin_required
def version(name: str, version: str) -> Any:
    report = _report(name, version)
    return render_template(
        "model_version.html", report=report, ev=report.evidence, v=report.evidence.version,
        modes=MODES, done=request.args.get("done"),
        since=request.args.get("since", ""), until=request.args.get("until", ""),
    )  # fmt: skip


@bp.post("/<name>/<version>/mode")
@admin_required
def change_mode(name: str, version: str) -> Any:
    try:
        change = site().governance.set_mode(
            name, version, request.form.get("mode", ""), by=g.user.username,
            reason=request.form.get("reason", ""),
        )  # fmt: skip
    except GovernanceError as exc:
        abort(400, str(exc))
    return redirect(url_for("monitoring.version", name=name, version=version,
                            done=f"mode changed to {change.mode}"))  # fmt: skip


@bp.get("/<name>/<version>/report.pdf")
@admin_required
def report_pdf(name: str, version: str) -> Any:
    report = _report(name, version)
    response = current_app.response_class(pdf(report), mimetype="application/pdf")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="monitoring-{_safe(name)}-{_safe(version)}.pdf"'
    )
    return response


@bp.get("/<name>/<version>/report.txt")
@admin_required
def report_text(name: str, version: str) -> Any:
    lines = report_lines(_report(name, version))
    return current_app.response_class("\n".join(lines) + "\n", mimetype="text/plain")


@bp.get("/export.<fmt>")
@admin_required
def export(fmt: str) -> Any:
    if fmt not in ("csv", "json"):
        abort(404, "The export is CSV or JSON.")
    since, until = _period()
    here = site()
    with here.db.session() as s:
        rows = registry_rows(s, since=since, until=until)
        record_export(s, g.user.username, fmt=fmt, rows=len(rows))
    body = export_csv(rows) if fmt == "csv" else export_json(rows)
    response = current_app.response_class(
        body, mimetype="text/csv" if fmt == "csv" else "application/json"
    )
    response.headers["Content-Disposition"] = f'attachment; filename="registry-export.{fmt}"'
    return response


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64]
