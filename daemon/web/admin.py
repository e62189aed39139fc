"""Admin pages: operations (pipeline counts, retries, C-ECHO) and model monitoring."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, url_for

from daemon.factories import destination_remote
from daemon.liveness import gone_after, worker_alert
from daemon.web import admin_required
from daemon.web.images import agreement_plot
from daemon.web.site import site
from db.drift import alerts, new_value_counts
from db.liveness import processes
from db.models import utcnow
from db.outbox import list_items, requeue_dead
from db.queue import requeue_failed_jobs, running_jobs
from db.reports import requeue_failed_reports
from db.results import recent_workers
from db.studies import pipeline_counts
from dicom_io.scu import echo

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("")
@admin_required
def admin() -> Any:
    here = site()
    with here.db.session() as s:
        counts = pipeline_counts(s)
        dead = list_items(s, state="dead", limit=50)
        running = running_jobs(s)
        workers = recent_workers(s, utcnow() - timedelta(hours=24))
        beats = processes(s, utcnow() - timedelta(days=1))
    now, limit = utcnow(), gone_after(here.config)
    return render_template(
        "admin.html", counts=counts, users=here.accounts.users(), dead=dead,
        destinations=here.config.delivery.destinations, echo=request.args.get("echo"),
        done=request.args.get("done"), running=running, worker=here.config.worker,
        workers=workers, alert=worker_alert(here.db, here.config), now=now,
        processes=[(p, p.alive(now, limit), int((now - p.beat_at).total_seconds()))
                   for p in beats],
    )  # fmt: skip


@bp.post("/jobs/retry")
@admin_required
def retry_jobs() -> Any:
    with site().db.session() as s:
        n = requeue_failed_jobs(s, actor=g.user.username)
    return redirect(url_for("admin.admin", done=f"{n} failed job(s) queued again"))


@bp.post("/reports/retry")
@admin_required
def retry_reports() -> Any:
    with site().db.session() as s:
        runs = requeue_failed_reports(s, actor=g.user.username)
    return redirect(url_for("admin.admin", done=f"{len(runs)} failed report(s) queued again"))


@bp.post("/deliveries/retry")
@admin_required
def retry_deliveries() -> Any:
    with site().db.session() as s:
        n = requeue_dead(s, actor=g.user.username)
    return redirect(url_for("admin.admin", done=f"{n} dead letter(s) queued again"))


@bp.post("/echo/<name>")
@admin_required
def echo_destination(name: str) -> Any:
    here = site()
    dest = next((d for d in here.config.delivery.destinations if d.name == name), None)
    if dest is None:
        abort(404, f"No PACS destination named {name!r}.")
    try:
        status = echo(destination_remote(here.config, dest))
        text = f"{name}: C-ECHO status 0x{status:04X}" + (" (success)" if status == 0 else "")
    except Exception as exc:
        text = f"{name}: {exc}"
    return redirect(url_for("admin.admin", echo=text))


@bp.get("/monitoring")
@admin_required
def monitoring() -> Any:
    here = site()
    with here.db.session() as s:
        raised = Counter((a.get("model"), a.get("version")) for a in alerts(s))
        new = new_value_counts(s)
    return render_template("monitoring.html", rows=here.reviews.stats(),
                           versions=here.governance.versions(), raised=raised,
                           new=new)  # fmt: skip


@bp.get("/monitoring.png")
@admin_required
def monitoring_plot() -> Any:
    png = agreement_plot(site().reviews.stats())
    return current_app.response_class(png, mimetype="image/png")
