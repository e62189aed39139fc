"""The one place that writes audit events.

Every stage records what it did through `record`, in the same transaction as
the change it describes, so the trail and the data never disagree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db.models import AuditEvent, utcnow


class EventType:
    ASSOCIATION_ACCEPTED = "association.accepted"
    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_FAILED = "instance.failed"
    STUDY_REOPENED = "study.reopened"
    STUDY_COMPLETED = "study.completed"
    JOB_QUEUED = "job.queued"


def record(
    session: Session,
    event_type: str,
    actor: str,
    *,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    **detail: Any,
) -> AuditEvent:
    event = AuditEvent(
        at=utcnow(),
        event_type=event_type,
        actor=actor,
        study_instance_uid=study_instance_uid,
        sop_instance_uid=sop_instance_uid,
        detail=detail,
    )
    session.add(event)
    return event


def events(session: Session, event_type: str | None = None) -> list[AuditEvent]:
    from sqlalchemy import select

    stmt = select(AuditEvent).order_by(AuditEvent.id)
    if event_type is not None:
        stmt = stmt.where(AuditEvent.event_type == event_type)
    return list(session.scalars(stmt))
