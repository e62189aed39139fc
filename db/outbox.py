"""The outbox: one row per object per destination, and every query on it.

The rows are the delivery queue. Retries, backoff and dead letters live in
them, not in memory, so they survive a restart of the daemon. Every state
change is conditional on the state it was read in: a DONE row never goes
back to PENDING except through `requeue_dead`, which only touches DEAD rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Select, Table, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import DeliveryState, OutboxItem, Study, utcnow
from db.session import changed_rows

ACTOR = "dispatcher"


class Commitment(StrEnum):
    """Values of OutboxItem.commitment_state."""

    NONE = "none"  # not asked for (or not yet stored)
    REQUESTED = "requested"  # stored; N-ACTION sent, N-EVENT-REPORT awaited
    COMMITTED = "committed"
    FAILED = "failed"  # the PACS reported it could not commit: sent again


@dataclass(frozen=True)
class NewOutboxItem:
    study_id: int
    run_id: int | None
    object_kind: str  # "sr", "seg", "verified-sr"
    sop_class_uid: str
    sop_instance_uid: str
    path: str  # relative to the state directory
    destination: str
    # PENDING, or HELD for a destination that takes results after review only.
    state: str = DeliveryState.PENDING


@dataclass(frozen=True)
class OutboxView:
    """One outbox row as read, detached from the session."""

    id: int
    study_instance_uid: str
    run_id: int | None
    object_kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: str
    destination: str
    state: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    commitment_state: str
    commitment_transaction_uid: str | None


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float
    max_seconds: float
    dead_after_seconds: float

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        # Capped before the power so that a long-dead destination cannot overflow.
        exponent = min(max(attempts - 1, 0), 32)
        return float(min(self.base_seconds * 2**exponent, self.max_seconds))


@dataclass(frozen=True)
class FailureOutcome:
    dead: bool
    attempts: int
    next_attempt_at: datetime


def _views(session: Session, stmt: Select[Any]) -> list[OutboxView]:
    rows = session.execute(
        stmt.add_columns(Study.study_instance_uid).join(Study, Study.id == OutboxItem.study_id)
    ).all()
    return [
        OutboxView(
            id=o.id,
            study_instance_uid=study_uid,
            run_id=o.run_id,
            object_kind=o.object_kind,
            sop_class_uid=o.sop_class_uid,
            sop_instance_uid=o.sop_instance_uid,
            path=o.path,
            destination=o.destination,
            state=o.state,
            attempts=o.attempts,
            created_at=o.created_at,
            next_attempt_at=o.next_attempt_at,
            last_status=o.last_status,
            last_error=o.last_error,
            delivered_at=o.delivered_at,
            commitment_state=o.commitment_state,
            commitment_transaction_uid=o.commitment_transaction_uid,
        )
        for o, study_uid in rows
    ]


def queue_items(
    session: Session, items: Iterable[NewOutboxItem], now: datetime | None = None
) -> int:
    """Insert outbox rows; an object already queued for a destination is left as it is."""
    now = now or utcnow()
    dialect = session.get_bind().dialect.name
    ins = pg_insert if dialect == "postgresql" else sqlite_insert
    queued = 0
    for item in items:
        stmt = (
            ins(cast(Table, OutboxItem.__table__))
            .values(
                study_id=item.study_id,
                run_id=item.run_id,
                object_kind=item.object_kind,
                sop_class_uid=item.sop_class_uid,
                sop_instance_uid=item.sop_instance_uid,
                path=item.path,
                destination=item.destination,
                state=item.state,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                commitment_state=Commitment.NONE,
            )
            .on_conflict_do_nothing(index_elements=["sop_instance_uid", "destination"])
            # RETURNING, not rowcount: psycopg reports -1 for this statement.
            .returning(OutboxItem.__table__.c.id)
        )
        queued += len(session.execute(stmt).all())
    return queued


def due_items(session: Session, now: datetime | None = None, limit: int = 200) -> list[OutboxView]:
    """Pending rows whose next attempt is due, oldest first.

    A row waiting for its storage commitment report has its next attempt set
    to the report's deadline, so it comes back here only if the report is late.
    """
    now = now or utcnow()
    return _views(
        session,
        select(OutboxItem)
        .where(OutboxItem.state == DeliveryState.PENDING, OutboxItem.next_attempt_at <= now)
        .order_by(OutboxItem.id)
        .limit(limit),
    )


def mark_done(session: Session, item: OutboxView, *, status: int, now: datetime) -> bool:
    """Stored at the destination (and committed when asked): never sent again."""
    changed = changed_rows(
        session,
        update(OutboxItem)
        .where(OutboxItem.id == item.id, OutboxItem.state == DeliveryState.PENDING)
        .values(
            state=DeliveryState.DONE,
            attempts=OutboxItem.attempts + 1,
            last_status=status,
            last_error=None,
            delivered_at=now,
        )
    )
    if changed:
        _audit(
            session,
            EventType.DELIVERY_DONE,
            ACTOR,
            item,
            object_kind=item.object_kind,
            attempts=item.attempts + 1,
            status=status,
        )
    return bool(changed)


def mark_commitment_requested(
    session: Session,
    items: Sequence[OutboxView],
    *,
    statuses: dict[int, int],
    transaction_uid: str,
    deadline: datetime,
) -> None:
    """Stored; the commitment request with `transaction_uid` is about to go out.

    Recorded before the N-ACTION is sent, so a report that comes back at once
    always finds its transaction. The attempt is counted now; the row stays
    PENDING with its next attempt at the report's deadline.
    """
    for item in items:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item.id, OutboxItem.state == DeliveryState.PENDING)
            .values(
                attempts=OutboxItem.attempts + 1,
                last_status=statuses.get(item.id),
                last_error=None,
                commitment_state=Commitment.REQUESTED,
                commitment_transaction_uid=transaction_uid,
                next_attempt_at=deadline,
            )
        )
    if items:
        audit.record(
            session,
            EventType.COMMITMENT_REQUESTED,
            ACTOR,
            destination=items[0].destination,
            transaction_uid=transaction_uid,
            sop_instance_uids=[i.sop_instance_uid for i in items],
        )


def record_failure(
    session: Session,
    item: OutboxView,
    *,
    status: int | None,
    error: str,
    policy: RetryPolicy,
    now: datetime,
    count_attempt: bool = True,
    commitment_state: str | None = None,
) -> FailureOutcome | None:
    """A failed attempt: back off exponentially, or give up once the item is too old.

    `count_attempt=False` is for a failure found after the attempt was already
    counted (a late or negative storage commitment report). None when the row
    is no longer pending (a commitment report won the race).
    """
    error = error[:2000]
    values: dict[str, object] = {
        "attempts": OutboxItem.attempts + (1 if count_attempt else 0),
        "last_status": status,
        "last_error": error,
    }
    if commitment_state is not None:
        values["commitment_state"] = commitment_state
    row = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item.id, OutboxItem.state == DeliveryState.PENDING)
        .values(**values)
        .returning(OutboxItem.attempts, OutboxItem.created_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    attempts, created_at = row
    # The dead-letter clock runs from when the object was queued (or re-queued).
    dead = now - created_at >= timedelta(seconds=policy.dead_after_seconds)
    next_at = now + timedelta(seconds=policy.delay(max(attempts, 1)))
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item.id)
        .values(
            state=DeliveryState.DEAD if dead else DeliveryState.PENDING,
            next_attempt_at=next_at,
        )
        .execution_options(synchronize_session=False)
    )
    _audit(
        session,
        EventType.DELIVERY_DEAD if dead else EventType.DELIVERY_ATTEMPT_FAILED,
        ACTOR,
        item,
        attempts=attempts,
        status=status,
        error=error,
    )
    return FailureOutcome(dead=dead, attempts=attempts, next_attempt_at=next_at)


def items_in_transaction(session: Session, transaction_uid: str) -> list[OutboxView]:
    """Pending rows waiting for the storage commitment report `transaction_uid`."""
    return _views(
        session,
        select(OutboxItem)
        .where(
            OutboxItem.commitment_transaction_uid == transaction_uid,
            OutboxItem.commitment_state == Commitment.REQUESTED,
            OutboxItem.state == DeliveryState.PENDING,
        )
        .order_by(OutboxItem.id),
    )


def mark_committed(session: Session, item: OutboxView, now: datetime) -> bool:
    """The destination took responsibility for the object: delivery is done."""
    changed = changed_rows(
        session,
        update(OutboxItem)
        .where(
            OutboxItem.id == item.id,
            OutboxItem.state == DeliveryState.PENDING,
            OutboxItem.commitment_transaction_uid == item.commitment_transaction_uid,
        )
        .values(
            state=DeliveryState.DONE,
            commitment_state=Commitment.COMMITTED,
            delivered_at=now,
        )
    )
    if changed:
        _audit(
            session,
            EventType.DELIVERY_DONE,
            ACTOR,
            item,
            object_kind=item.object_kind,
            attempts=item.attempts,
            committed=True,
            transaction_uid=item.commitment_transaction_uid,
        )
    return bool(changed)


def requeue_dead(
    session: Session,
    *,
    ids: Sequence[int] = (),
    destination: str | None = None,
    actor: str = "cli",
    now: datetime | None = None,
) -> int:
    """Dead letters back to PENDING, due now, with a fresh dead-letter window.

    The window runs from `created_at`, so that is reset too; when the object
    was first queued stays in the audit trail (report.created).
    """
    now = now or utcnow()
    stmt = select(OutboxItem).where(OutboxItem.state == DeliveryState.DEAD)
    if ids:
        stmt = stmt.where(OutboxItem.id.in_(list(ids)))
    if destination is not None:
        stmt = stmt.where(OutboxItem.destination == destination)
    items = _views(session, stmt.order_by(OutboxItem.id))
    for item in items:
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item.id, OutboxItem.state == DeliveryState.DEAD)
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                commitment_state=Commitment.NONE,
                commitment_transaction_uid=None,
            )
        )
        _audit(
            session,
            EventType.DELIVERY_REQUEUED,
            actor,
            item,
            previous_attempts=item.attempts,
            last_error=item.last_error,
        )
    return len(items)


def list_items(session: Session, *, state: str | None = None, limit: int = 100) -> list[OutboxView]:
    stmt = select(OutboxItem)
    if state is not None:
        stmt = stmt.where(OutboxItem.state == state)
    return _views(session, stmt.order_by(OutboxItem.id.desc()).limit(limit))


def outbox_counts(session: Session) -> dict[str, int]:
    """Outbox rows by state: pending, done, dead."""
    rows = session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all()
    return {state: n for state, n in rows}


def _audit(session: Session, event: str, actor: str, item: OutboxView, **details: Any) -> None:
    """An audit row about one outbox item: its study, object and destination, then `details`."""
    audit.record(
        session,
        event,
        actor,
        study_instance_uid=item.study_instance_uid,
        sop_instance_uid=item.sop_instance_uid,
        destination=item.destination,
        **details,
    )
