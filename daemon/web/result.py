"""A result: its image viewer, its findings, and the two-step decision.

Nothing is signed by accident. A reader first chooses (confirm, reject, or
correct by placing a marker on the image) and presses "Review and sign";
that records nothing and shows exactly what would go to the PACS. Only the
Sign button on that page signs, and only what it showed (the choices travel
with an HMAC under the session's CSRF token). Enter in a text field never
submits a decision: each form's default button is a disabled one, so the
browser's implicit submission does nothing, with or without JavaScript.

A signed decision waits `review.undo_seconds` before its verified SR is
built (daemon/stages/review.py); Undo withdraws it meanwhile. A verified result
is changed by an amendment, with a reason, signed the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import Blueprint, abort, g, redirect, render_template, request, url_for
from pydicom import dcmread

from daemon.stages.review import Correction, ReviewError
from daemon.web import login_required
from daemon.web.history import clinical_history, provenance_lines
from daemon.web.site import site
from db.models import Decision, utcnow
from db.reviews import FindingView, ResultView, run_provenance

bp = Blueprint("result", __name__, url_prefix="/results")


@dataclass(frozen=True)
class Choice:
    """One decision as chosen on the page, before it is signed."""

    finding: int
    decision: str
    comment: str = ""
    slice_uid: str = ""  # a correction: the image, and the marker's (column, row)
    col: float | None = None
    row: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"finding": self.finding, "decision": self.decision, "comment": self.comment,
                "slice_uid": self.slice_uid, "col": self.col, "row": self.row}  # fmt: skip


def key_slice(view: ResultView, index: dict[str, int], n: int) -> int:
    """The image to open on: the most telling located finding's, else the middle one."""
    located = [f for f in view.findings if f.sop_instance_uid in index]
    if not located:
        return n // 2
    top = max(located, key=lambda f: (f.present, f.probability))
    return index[top.sop_instance_uid or ""]


def _show(run_id: int) -> tuple[ResultView, list[dict[str, Any]]]:
    try:
        return site().reviews.show(run_id)
    except ReviewError as exc:
        abort(404, str(exc))


@bp.get("/<int:run_id>")
@login_required
def result(run_id: int) -> Any:
    here = site()
    view, history = _show(run_id)
    with here.db.session() as s:
        provenance = run_provenance(s, run_id)
    images = here.series(run_id)
    shown = request.args.get("slice", type=int)
    if images:
        index = {i.sop_instance_uid: k for k, i in enumerate(images)}
        shown = key_slice(view, index, len(images)) if shown is None else shown
        shown = min(max(shown, 0), len(images) - 1)
    viewer = (
        here.config.web.viewer_url_template.format(study_uid=view.study_instance_uid)
        if here.config.web.viewer_url_template
        else None
    )
    return render_template(
        "result.html", r=view, study=here.study(view.study_instance_uid,
                                                view.ai_sr_sop_instance_uid),
        viewer=viewer, n_images=len(images), shown=shown,
        overlay=request.args.get("overlay") == "1",
        provenance=provenance_lines(view, provenance), history=clinical_history(history),
        events=history, undoable=_undoable(view), destinations=here.config.delivery.destinations,
        undo_seconds=here.config.review.undo_seconds,
        own_undo=request.args.get("signed") == str(run_id),
    )  # fmt: skip


def _undoable(view: ResultView) -> Any:
    """When the logged-in reader's held decisions go out (naive UTC), or None."""
    window = timedelta(seconds=site().config.review.undo_seconds)
    mine = [d for d in view.decisions
            if d.round == view.round and d.reviewer == g.user.full_name]  # fmt: skip
    if not mine or window.total_seconds() == 0:
        return None
    due = max(d.decided_at for d in mine) + window
    return due if due > utcnow() else None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _choices(form: Any, view: ResultView, prefix: str) -> list[Choice]:
    """The decisions chosen in the form: `decision-N`, `comment-N`, and the marker fields."""
    out = []
    for f in view.findings:
        decision = form.get(f"{prefix}decision-{f.number}", "")
        if not decision:
            continue
        if decision not in tuple(Decision):
            abort(400, f"Unknown decision {decision!r}.")
        choice = Choice(
            f.number, decision, (form.get(f"{prefix}comment-{f.number}") or "").strip()[:1000],
            form.get(f"{prefix}slice-{f.number}", ""),
            _float(form.get(f"{prefix}col-{f.number}")),
            _float(form.get(f"{prefix}row-{f.number}")),
        )  # fmt: skip
        if decision == Decision.CORRECT:
            _check_marker(view, choice)
        out.append(choice)
    return out


def _check_marker(view: ResultView, c: Choice) -> None:
    images = {i.sop_instance_uid: i for i in site().series(view.run_id)}
    if c.slice_uid not in images or c.col is None or c.row is None:
        abort(400, f"To correct finding {c.finding}, place the marker on the image where the "
                   "finding really is (click the image), then review and sign.")  # fmt: skip
    header = dcmread(images[c.slice_uid].path, stop_before_pixels=True,
                     specific_tags=["Rows", "Columns"])  # fmt: skip
    if not (0 <= c.col < int(header.Columns) and 0 <= c.row < int(header.Rows)):
        abort(400, "The marker lies outside the image.")


def _digest(run_id: int, mode: str, reason: str, choices: list[Choice]) -> str:
    # What the sign page showed, bound to this session: the Sign button signs only that.
    payload = json.dumps([run_id, mode, reason, [c.as_dict() for c in choices]], sort_keys=True)
    return hmac.new(str(g.csrf).encode(), payload.encode(), hashlib.sha256).hexdigest()


@bp.post("/<int:run_id>/prepare")
@login_required
def prepare(run_id: int) -> Any:
    """Step one: what the chosen decisions would send; records nothing."""
    view, _ = _show(run_id)
    mode = request.form.get("mode", "decide")
    if mode == "amend":
        if not view.verifications:
            abort(409, "This result is not verified yet: decide it instead of amending it.")
        choices = _choices(request.form, view, "amend-")
        reason = (request.form.get("reason") or "").strip()[:1000]
        if len(choices) != 1 or not reason:
            abort(400, "An amendment changes one finding and says why: choose the finding's new "
                       "decision and write the reason.")  # fmt: skip
    elif mode == "decide":
        if view.verifications:
            abort(409, _verified_message(view))
        choices, reason = _choices(request.form, view, ""), ""
        decided = {d.finding_id for d in view.decisions if d.round == view.round}
        numbers = {f.number for f in view.findings if f.finding_id in decided}
        if not choices:
            abort(400, "Choose Confirm, Reject or Correct for a finding first.")
        if any(c.finding in numbers for c in choices):
            abort(409, "A finding you chose is decided already: open the result again.")
    else:
        abort(400, "Unknown mode.")
    return render_template(
        "sign.html", r=view, mode=mode, reason=reason, choices=choices,
        lines=[_sign_line(view, c) for c in choices], completes=_completes(view, choices, mode),
        digest=_digest(run_id, mode, reason, choices), payload=json.dumps(
            [c.as_dict() for c in choices]), reviewer=g.user.full_name,
        organization=site().config.review.organization,
        destinations=site().config.delivery.destinations,
        undo_seconds=site().config.review.undo_seconds,
        study=site().study(view.study_instance_uid, view.ai_sr_sop_instance_uid),
    )  # fmt: skip


def _verified_message(view: ResultView) -> str:
    v = view.verifications[-1]
    return (f"Result #{view.run_id} is verified already, by {v.reviewer} "
            f"({v.created_at:%Y-%m-%d %H:%M} UTC). Amend it, with a reason, "
            "to change it.")  # fmt: skip


def _completes(view: ResultView, choices: list[Choice], mode: str) -> bool:
    if mode == "amend":
        return True
    decided = {d.finding_id for d in view.decisions if d.round == view.round}
    chosen = {c.finding for c in choices}
    return all(f.finding_id in decided or f.number in chosen for f in view.findings)


def _finding(view: ResultView, number: int) -> FindingView:
    return next(f for f in view.findings if f.number == number)


def _sign_line(view: ResultView, c: Choice) -> str:
    """What the verified SR will state for this finding, in words."""
    f = _finding(view, c.finding)
    ai = "present" if f.present else "absent"
    head = f"Finding {f.number}, {f.finding} in {f.site} (AI: {ai})"
    if c.decision == Decision.CONFIRM:
        what = (f"CONFIRMED: stated {ai}" + (", at the AI's location" if f.present and f.box
                                              else ""))  # fmt: skip
    elif c.decision == Decision.REJECT:
        flipped = "absent" if f.present else "present"
        what = f"REJECTED: stated {flipped}" + (
            ", framed as its whole key image (the AI's spot removed)" if f.sop_instance_uid
            else "")  # fmt: skip
    else:
        images = [i.sop_instance_uid for i in site().series(view.run_id)]
        k = images.index(c.slice_uid) + 1
        what = (f"CORRECTED: stated present at column {c.col:.0f}, row {c.row:.0f} of image "
                f"{k} of {len(images)}")  # fmt: skip
    comment = f'; comment "{c.comment}"' if c.comment else "; no comment"
    return f"{head}: {what}{comment}."


@bp.post("/<int:run_id>/sign")
@login_required
def sign(run_id: int) -> Any:
    """Step two: sign exactly what the sign page showed."""
    here = site()
    view, _ = _show(run_id)
    mode = request.form.get("mode", "")
    reason = request.form.get("reason", "")
    try:
        choices = [Choice(**c) for c in json.loads(request.form.get("payload", "[]"))]
    except (TypeError, ValueError):
        abort(400, "The signed decisions could not be read: review them again.")
    sent = request.form.get("digest", "")
    if not choices or not hmac.compare_digest(sent, _digest(run_id, mode, reason, choices)):
        abort(400, "These decisions were not reviewed on the sign page: review them again.")
    reviewer = here.reviews.reviewer(g.user.full_name)
    signed: list[int] = []
    try:
        if mode == "amend":
            (c,) = choices
            here.reviews.amend(run_id, c.finding, c.decision, reviewer, reason=reason,
                               comment=c.comment or None, correction=_correction(c))  # fmt: skip
        else:
            for c in choices:
                here.reviews.decide(run_id, c.decision, reviewer, finding=c.finding,
                                    comment=c.comment or None, correction=_correction(c),
                                    hold=True)  # fmt: skip
                signed.append(c.finding)
    except ReviewError as exc:
        # Each finding is its own decision: say which went through before this one failed.
        extra = (f" Finding(s) {', '.join(map(str, signed))} were signed before this: Undo on "
                 "the result page takes them back within the undo window." if signed else "")
        here.on_signed(here.reviews.next_release())
        abort(409, f"{exc}.{extra}")
    here.on_signed(here.reviews.next_release())
    if request.form.get("after") == "next":
        return redirect(url_for("worklist.next_case", after=run_id, signed=run_id))
    return redirect(url_for("result.result", run_id=run_id, signed=run_id))


def _correction(c: Choice) -> Correction | None:
    if c.decision != Decision.CORRECT or c.col is None or c.row is None:
        return None
    return Correction(c.slice_uid, point=(c.col, c.row))


@bp.post("/<int:run_id>/undo")
@login_required
def undo(run_id: int) -> Any:
    here = site()
    try:
        numbers = here.reviews.undo(run_id, here.reviews.reviewer(g.user.full_name))
    except ReviewError as exc:
        abort(409, str(exc))
    return redirect(url_for("result.result", run_id=run_id,
                            undone=",".join(map(str, numbers))))  # fmt: skip
