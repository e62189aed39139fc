"""The one place that writes audit events.

Every stage records what it did through `record`, in the same transaction as
the change it describes, so the trail and the data never disagree.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Table, select
from sqlalchemy import insert as sa_insert
from sqlalchemy.orm import Session

from db import chain
from db.models import AuditEvent, utcnow

# Session.info key of the audit key (db.session.Database sets it): a row
# written through a session without it is unsigned, and `audit verify` says so.
KEY_INFO = "audit_key"


class EventType:
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    # Cut by us (a deadline, an oversized PDU) or aborted by the peer.
    ASSOCIATION_ABORTED = "association.aborted"
    # Admitted, then sent nothing within scp.idle_association_seconds: we released it.
    ASSOCIATION_RELEASED = "association.released"
    # Audit rows the receive path could not even queue while the database was
    # unavailable (daemon/stages/receive/audit_backlog.py): how many, written once it is back.
    AUDIT_DROPPED = "audit.dropped"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_FAILED = "instance.failed"
    # Stored (or dropped, per scp.non_image_objects) but never analysed: a
    # non-image object, or one of ours the PACS sent back.
    INSTANCE_IGNORED = "instance.ignored"
    # A spool file whose row a crash lost (power loss under synchronous=NORMAL).
    INSTANCE_RECOVERED = "instance.recovered"
    STUDY_REOPENED = "study.reopened"
    # An MPPS N-CREATE or N-SET from a modality (dicom_io/mpps.py, db/mpps.py).
    MPPS_UPDATED = "mpps.updated"
    STUDY_COMPLETED = "study.completed"
    JOB_QUEUED = "job.queued"
    # The infer stage (db/queue.py): one event per transition of a job's lease.
    JOB_CLAIMED = "job.claimed"
    JOB_FINISHED = "job.finished"
    JOB_ATTEMPT_FAILED = "job.attempt_failed"  # will be retried after a backoff
    JOB_FAILED = "job.failed"  # gave up after worker.max_attempts
    JOB_RELEASED = "job.released"  # worker stopping: back to the queue, attempt not counted
    JOB_LEASE_EXPIRED = "job.lease_expired"  # worker died or hung: attempt counted
    JOB_REQUEUED = "job.requeued"  # a failed job queued again by an administrator
    ANALYSIS_RECORDED = "analysis.recorded"  # one AnalysisRun and its findings
    # The report and deliver stages (db/reports.py, db/outbox.py).
    REPORT_CREATED = "report.created"  # SR (+ SEG) built and queued in the outbox
    REPORT_FAILED = "report.failed"  # could not be built; the run needs attention
    # The second pass: the objects beside the SR (map, GSPS, summary) queued.
    REPORT_EXTRAS_CREATED = "report.extras_created"
    REPORT_REQUEUED = "report.requeued"  # `secondreader reports retry`
    # A silent model version's run: recorded and monitored, nothing built or sent.
    REPORT_WITHHELD = "report.withheld"
    # Governance (db/governance.py): a model version's mode set by an admin, with the reason.
    MODEL_MODE_CHANGED = "model.mode_changed"
    # The registry export (`secondreader model export`, the monitoring page): who took it.
    MONITORING_EXPORTED = "monitoring.exported"
    DELIVERY_DONE = "delivery.done"  # stored (and committed, when asked) at a destination
    DELIVERY_ATTEMPT_FAILED = "delivery.attempt_failed"  # will be retried after a backoff
    DELIVERY_DEAD = "delivery.dead"  # gave up: `secondreader deliveries retry` re-queues
    DELIVERY_REQUEUED = "delivery.requeued"
    COMMITMENT_REQUESTED = "delivery.commitment_requested"
    # Physician review (db/reviews.py, daemon/stages/review.py).
    REVIEW_DECIDED = "review.decided"  # one finding confirmed, rejected or corrected
    REVIEW_AMENDED = "review.amended"  # a decided finding decided again, with a reason
    # Signed decisions withdrawn by their reviewer inside the undo window,
    # before their verified SR was built (nothing reached the PACS).
    REVIEW_UNDONE = "review.undone"
    VERIFIED_SR_CREATED = "review.verified_sr_created"
    RELEASE_HELD = "release.held"  # AI object held for review (release = after_review)
    RELEASE_RELEASED = "release.released"  # held object sent after the review
    RELEASE_WITHHELD = "release.withheld"  # held object never sent: the site sends the verified SR
    # Retention (daemon/stages/retain.py): a finished study's files removed; its rows stay.
    STUDY_FILES_REMOVED = "study.files_removed"
    # Scheduled pull (daemon/stages/pull.py): one per poll, one per C-MOVE.
    PULL_POLLED = "pull.polled"
    PULL_MOVED = "pull.moved"
    PULL_FAILED = "pull.failed"
    # Accounts and the web page (daemon/accounts.py): who, never a password.
    USER_CREATED = "user.created"
    USER_PASSWORD_CHANGED = "user.password_changed"
    USER_DISABLED = "user.disabled"
    USER_ENABLED = "user.enabled"
    USER_UNLOCKED = "user.unlocked"
    LOGIN_SUCCEEDED = "login.succeeded"
    LOGIN_FAILED = "login.failed"
    LOGIN_LOCKED = "login.locked"  # too many wrong passwords: locked for a while
    LOGOUT = "logout"
    # The monitor stage (daemon/stages/monitor/, db/drift.py): a scanner value
    # (manufacturer, model, kernel) never seen in a model version's baseline,
    # once per value and version; a period whose inputs drifted, once per period.
    DRIFT_NEW_VALUE = "drift.new_value"
    DRIFT_ALERT = "drift.alert"
    # The bookkeeper (db/chain.py): rows chained, with the head of the chain.
    AUDIT_SEALED = "audit.sealed"


def record(
    session: Session,
    event_type: str,
    actor: str,
    *,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    at: datetime | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add one signed row; `at` is when it happened (default now), for rows written late."""
    event = AuditEvent(
        **_signed_row(session, event_type, actor, study_instance_uid, sop_instance_uid, detail, at)
    )
    session.add(event)
    return event


_INSERT = sa_insert(cast(Table, AuditEvent.__table__))


def insert(
    session: Session,
    event_type: str,
    actor: str,
    *,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    **detail: Any,
) -> None:
    """`record` as one INSERT, for the receive path (an event per instance).

    The same row, signed the same way; no ORM object to flush, which was a
    tenth of the receive stage's CPU per instance.
    """
    row = _signed_row(session, event_type, actor, study_instance_uid, sop_instance_uid, detail)
    session.execute(_INSERT, row)  # the row as parameters: see db/ingest.py


def _signed_row(
    session: Session,
    event_type: str,
    actor: str,
    study_instance_uid: str | None,
    sop_instance_uid: str | None,
    detail: dict[str, Any],
    at: datetime | None = None,
) -> dict[str, Any]:
    """An audit row's columns, with its row MAC when the trail is signed (db/chain.py)."""
    row: dict[str, Any] = {
        "at": at if at is not None else utcnow(),
        "event_type": event_type,
        "actor": actor,
        "study_instance_uid": study_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        # As the JSON column gives it back: what is signed is what is read.
        "detail": json.loads(json.dumps(detail, default=str)),
        "nonce": secrets.token_hex(16),
    }
    key = session.info.get(KEY_INFO)
    row["row_mac"] = chain.row_mac(key, SimpleNamespace(**row)) if key is not None else None
    return row


def study_story(
    session: Session, *, study_instance_uid: str | None = None, since: datetime | None = None
) -> list[AuditEvent]:
    """The trail in time order; for one study, its events and its associations'.

    An association carries no study; its events are linked to the study
    through the association id its instances' events name.
    """
    stmt = select(AuditEvent).order_by(AuditEvent.at, AuditEvent.id)
    if since is not None:
        stmt = stmt.where(AuditEvent.at >= since)
    if study_instance_uid is None:
        return list(session.scalars(stmt))
    own = list(session.scalars(stmt.where(AuditEvent.study_instance_uid == study_instance_uid)))
    ids = {e.detail.get("association") for e in own} - {None}
    linked = [
        e
        for e in session.scalars(
            stmt.where(
                AuditEvent.event_type.like("association.%"),
                AuditEvent.study_instance_uid.is_(None),
            )
        )
        if e.detail.get("association") in ids
    ]
    return sorted([*own, *linked], key=lambda e: (e.at, e.id))


def events(session: Session, event_type: str | None = None) -> list[AuditEvent]:
    from sqlalchemy import select

    stmt = select(AuditEvent).order_by(AuditEvent.id)
    if event_type is not None:
        stmt = stmt.where(AuditEvent.event_type == event_type)
    return list(session.scalars(stmt))


def event_counts(session: Session) -> dict[str, int]:
    """Events by type since the start of the trail (monotonic: the trail is append-only)."""
    from sqlalchemy import func, select

    rows = session.execute(
        select(AuditEvent.event_type, func.count()).group_by(AuditEvent.event_type)
    ).all()
    return {event_type: n for event_type, n in rows}
