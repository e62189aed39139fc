"""What the scheduled pull found and asked for (daemon/stages/pull.py): nothing pulled twice."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import PulledStudy, Study, utcnow

PULLED = "pulled"
PRESENT = "present"
RETRY = "retry"
FAILED = "failed"


def to_pull(session: Session, uids: Iterable[str], source_ae: str) -> list[str]:
    """The UIDs to C-MOVE now: new ones and those to retry, in the order given.

    A new UID of a study we already have (sent by the modality, or routed by
    the PACS) is recorded as present and not asked for.
    """
    uids = list(dict.fromkeys(uids))
    known = {
        p.study_instance_uid: p
        for p in session.scalars(
            select(PulledStudy).where(PulledStudy.study_instance_uid.in_(uids))
        )
    }
    here = set(
        session.scalars(select(Study.study_instance_uid).where(Study.study_instance_uid.in_(uids)))
    )
    now = utcnow()
    out = []
    for uid in uids:
        row = known.get(uid)
        if row is None:
            state = PRESENT if uid in here else RETRY
            session.add(
                PulledStudy(
                    study_instance_uid=uid, source_ae=source_ae, state=state, attempts=0,
                    found_at=now, updated_at=now,
                )
            )  # fmt: skip
            if state == RETRY:
                out.append(uid)
        elif row.state == RETRY:
            out.append(uid)
    return out


def record_move(
    session: Session,
    uid: str,
    *,
    ok: bool,
    status: int | None,
    error: str | None,
    max_attempts: int,
    detail: dict[str, Any],
    now: datetime | None = None,
) -> str:
    """The C-MOVE's outcome; returns the study's new state."""
    row = session.scalars(select(PulledStudy).where(PulledStudy.study_instance_uid == uid)).one()
    row.attempts += 1
    row.last_status = status
    row.last_error = error
    row.updated_at = now or utcnow()
    row.state = PULLED if ok else (FAILED if row.attempts >= max_attempts else RETRY)
    audit.record(
        session,
        EventType.PULL_MOVED if ok else EventType.PULL_FAILED,
        "puller",
        study_instance_uid=uid,
        attempts=row.attempts,
        status=status,
        state=row.state,
        **detail,
    )
    return row.state


def record_poll(session: Session, source_ae: str, *, matches: int, new: int) -> None:
    audit.record(
        session, EventType.PULL_POLLED, "puller", source=source_ae, matches=matches, new=new
    )


def pull_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(PulledStudy.state, func.count()).group_by(PulledStudy.state)
    ).all()
    return {state: n for state, n in rows}
