"""The worklist: AI results to review, with the columns that match them to the PACS.

Patient, ID, accession number and study description come from the AI SR's
header (the study as the PACS has it), so a reader finds the same case in
both. Triage order by default (daemon/reviewer.triage_key); any column sorts
on a click, with or without JavaScript. The page reloads itself every
minute, so new results appear without a click.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for

from daemon.stages.review import triage_key
from daemon.web import login_required
from daemon.web.site import StudyInfo, site
from db.models import utcnow
from db.reviews import FindingView, ResultView

bp = Blueprint("worklist", __name__)

STATES = ("pending", "in_review", "decided", "all")
REFRESH_SECONDS = 60


@dataclass(frozen=True)
class Row:
    result: ResultView
    study: StudyInfo
    top: FindingView | None
    age: str
    priority: str  # "high": the AI calls a finding present; "routine" otherwise


def _age(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} days"


# Column -> sort key; "triage" is the default order.
SORTS: dict[str, Callable[[Row], Any]] = {
    "triage": lambda w: triage_key(w.result),
    "patient": lambda w: w.study.patient_name.upper(),
    "patient_id": lambda w: w.study.patient_id,
    "accession": lambda w: w.study.accession_number,
    "description": lambda w: w.study.study_description.upper(),
    "study_date": lambda w: w.study.study_date,
    "modality": lambda w: w.result.modality or "",
    "finding": lambda w: (w.top.finding, not w.top.present) if w.top else ("", True),
    "probability": lambda w: w.result.top_probability,
    "age": lambda w: w.result.created_at,
    "priority": lambda w: w.priority != "high",
    "state": lambda w: w.result.state,
}


def rows(state: str, **filters: Any) -> list[Row]:
    here, now = site(), utcnow()
    out = []
    for r in here.reviews.results(state=None if state == "all" else state, **filters):
        top = max(r.findings, key=lambda f: (f.present, f.probability), default=None)
        priority = "high" if any(f.present for f in r.findings) else "routine"
        out.append(Row(r, here.study(r.study_instance_uid, r.ai_sr_sop_instance_uid), top,
                       _age(now - r.created_at), priority))  # fmt: skip
    return out


@bp.get("/")
@login_required
def worklist() -> Any:
    state = request.args.get("state", "pending")
    sort = request.args.get("sort", "triage")
    descending = request.args.get("order", "asc") == "desc"
    if state not in STATES or sort not in SORTS:
        abort(400, "Unknown state or sort column.")
    since = None
    if request.args.get("since"):
        try:
            since = datetime.fromisoformat(request.args["since"])
        except ValueError:
            abort(400, "Analysed since: a date as YYYY-MM-DD.")
    found = rows(
        state, modality=request.args.get("modality") or None,
        model=request.args.get("model") or None, since=since,
    )  # fmt: skip
    if sort != "triage":
        found.sort(key=SORTS[sort], reverse=descending)
    return render_template(
        "worklist.html", rows=found, state=state, sort=sort, descending=descending,
        refresh=REFRESH_SECONDS,
    )  # fmt: skip


@bp.get("/next")
@login_required
def next_case() -> Any:
    """The next result to read after `after`, in triage order; the worklist when none is left."""
    after = request.args.get("after", type=int)
    for row in rows("pending"):
        if row.result.run_id != after:
            return redirect(url_for("result.result", run_id=row.result.run_id,
                                    signed=request.args.get("signed")))  # fmt: skip
    return redirect(url_for("worklist.worklist", signed=request.args.get("signed")))
