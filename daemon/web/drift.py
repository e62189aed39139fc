"""The drift page of a model version (admins): each period against the baseline.

A table per period of every variable's test, statistic, PSI, p-value and
alert; the scanner values the baseline never saw, with when each was first
seen and reported; and a plot per variable (daemon/web/drift_plots.py). The
figures are computed here from the observations, as `model drift` does, so
the page shows the current partial picture before the drift job's next pass.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, current_app, render_template

from daemon.stages.monitor.drift import VARIABLES
from daemon.stages.monitor.watch import Monitor
from daemon.web import admin_required
from daemon.web.drift_plots import drift_plot
from daemon.web.site import site
from db.drift import new_values
from db.monitoring import observations

bp = Blueprint("drift", __name__, url_prefix="/admin/monitoring")


@bp.get("/<name>/<version>/drift")
@admin_required
def drift(name: str, version: str) -> Any:
    here = site()
    report = Monitor(here.db, here.config.monitoring).report(name, version)
    if report is None:
        abort(404, f"No observations of model {name} {version}.")
    with here.db.session() as s:
        reported = {(d.get("variable"), d.get("value")): d for d in new_values(s, name, version)}
    return render_template(
        "drift.html", report=report, settings=here.config.monitoring, reported=reported,
        variables=VARIABLES,
    )  # fmt: skip


@bp.get("/<name>/<version>/drift/<variable>.png")
@admin_required
def drift_png(name: str, version: str, variable: str) -> Any:
    if variable not in VARIABLES:
        abort(404, f"No variable {variable!r}.")
    here = site()
    with here.db.session() as s:
        rows = observations(s, model_name=name, model_version=version)
    report = Monitor(here.db, here.config.monitoring).report(name, version)
    if report is None:
        abort(404, f"No observations of model {name} {version}.")
    png = drift_plot(rows, report, variable, here.config.monitoring.psi_bound)
    return current_app.response_class(png, mimetype="image/png")
