"""Recording received instances: the receive stage's only database call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import AncillaryInstance, Instance, OutboxItem, Series, Study, StudyState, utcnow
from db.session import changed_rows


class UIDConflict(Exception):
    """The object reuses a UID recorded under another study or series.

    Never re-pointed: the recorded instance, its file and its study stay as
    they are. `other_study` is the study that holds the UID already.
    """

    def __init__(self, message: str, other_study: str) -> None:
        super().__init__(message)
        self.other_study = other_study


@dataclass(frozen=True)
class StoredInstance:
    """What the receive path knows about one instance it has put on disk."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str  # relative to the spool root
    size_bytes: int
    calling_ae: str
    association_id: str | None = None  # links the instance to its association's events


# The receive path's statements, built once: SQLAlchemy then finds each one's
# compiled form by a cache key it computed the first time, instead of building
# the statement and its key again for every instance (a third of the database
# time per instance, inside the write lock; bench/ingest.py).
_studies, _series = cast(Table, Study.__table__), cast(Table, Series.__table__)
_TOUCH_RECEIVING_STUDY = (
    update(_studies)
    .where(
        _studies.c.study_instance_uid == bindparam("uid"),
        _studies.c.state == StudyState.RECEIVING,
    )
    .values(last_received_at=bindparam("now"))
    .returning(_studies.c.id)
)
_SERIES_BY_UID = select(_series.c.id, _series.c.study_id).where(
    _series.c.series_instance_uid == bindparam("uid")
)
_INSERT_IGNORE: dict[tuple[str, str, str], Any] = {}  # (dialect, table, key) -> statement


def _insert_ignore(session: Session, table: Any, values: dict[str, Any], key: str) -> bool:
    """INSERT ... ON CONFLICT (key) DO NOTHING; True if a row was inserted.

    Concurrent associations may race here. RETURNING tells reliably on both
    backends whether the row went in (rowcount does not, with psycopg).
    """
    dialect = session.get_bind().dialect.name
    cache_key = (dialect, table.name, key)
    stmt = _INSERT_IGNORE.get(cache_key)
    if stmt is None:
        ins = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = ins(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c.id)
        _INSERT_IGNORE[cache_key] = stmt
    # The values go as parameters: the statement names no columns, so each
    # call inserts exactly the columns it is given.
    return session.execute(stmt, values).first() is not None


def _study_id(session: Session, item: StoredInstance, now: datetime) -> int:
    """The study's id, created or re-opened as needed, its last_received_at set to `now`."""
    # The common case in one statement: the study exists and is receiving.
    # On the table, not the mapped class: an ORM-enabled UPDATE costs the
    # receive path its session synchronisation, once per instance.
    row = session.execute(
        _TOUCH_RECEIVING_STUDY, {"uid": item.study_instance_uid, "now": now}
    ).first()
    if row is not None:
        return int(row[0])
    _insert_ignore(
        session,
        Study.__table__,
        {
            "study_instance_uid": item.study_instance_uid,
            "state": StudyState.RECEIVING,
            "first_received_at": now,
            "receiving_since": now,
            "last_received_at": now,
            "completion_count": 0,
        },
        "study_instance_uid",
    )
    study_id, state = session.execute(
        select(Study.id, Study.state).where(Study.study_instance_uid == item.study_instance_uid)
    ).one()
    if state == StudyState.COMPLETE:
        reopened = changed_rows(
        session,
            update(Study)
            .where(Study.id == study_id, Study.state == StudyState.COMPLETE)
            .values(state=StudyState.RECEIVING, receiving_since=now, last_received_at=now)
        )
        if reopened:
            audit.record(
                session,
                EventType.STUDY_REOPENED,
                item.calling_ae,
                study_instance_uid=item.study_instance_uid,
            )
    else:
        session.execute(update(Study).where(Study.id == study_id).values(last_received_at=now))
    return int(study_id)


def _study_uid(session: Session, study_id: int) -> str:
    return str(
        session.execute(select(Study.study_instance_uid).where(Study.id == study_id)).scalar_one()
    )


def _series_id(session: Session, item: StoredInstance, study_id: int) -> int:
    def existing() -> int | None:
        row = session.execute(_SERIES_BY_UID, {"uid": item.series_instance_uid}).first()
        if row is None:
            return None
        if row.study_id != study_id:
            raise UIDConflict(
                "Series Instance UID already recorded in another study",
                _study_uid(session, row.study_id),
            )
        return int(row.id)

    series_id = existing()
    if series_id is None:
        _insert_ignore(
            session,
            Series.__table__,
            {
                "study_id": study_id,
                "series_instance_uid": item.series_instance_uid,
                "modality": item.modality,
            },
            "series_instance_uid",
        )
        series_id = existing()
    assert series_id is not None
    return int(series_id)


def record_instance(session: Session, item: StoredInstance, now: datetime | None = None) -> bool:
    """Upsert study, series and instance; returns True when the instance is new.

    A re-sent instance (same SOP Instance UID) only bumps its receive count.
    An instance for a completed study re-opens it, so it is completed again.

    The common case (a new instance of a study already receiving, in a known
    series) takes four statements: this runs once per received object, inside
    the SQLite write lock, so every statement counts (bench/ingest.py).
    """
    now = now or utcnow()
    study_id = _study_id(session, item, now)
    series_id = _series_id(session, item, study_id)
    is_new = _insert_ignore(
        session,
        Instance.__table__,
        {
            "series_id": series_id,
            "sop_instance_uid": item.sop_instance_uid,
            "sop_class_uid": item.sop_class_uid,
            "transfer_syntax_uid": item.transfer_syntax_uid,
            "path": item.path,
            "size_bytes": item.size_bytes,
            "received_at": now,
            "calling_ae": item.calling_ae,
            "receive_count": 1,
        },
        "sop_instance_uid",
    )
    if not is_new:
        recorded_series = session.execute(
            select(Instance.series_id).where(Instance.sop_instance_uid == item.sop_instance_uid)
        ).scalar_one()
        if recorded_series != series_id:
            # Raised before anything is updated: the transaction rolls back,
            # the study this object would have created or re-opened included.
            other = session.execute(
                select(Study.study_instance_uid)
                .join(Series, Series.study_id == Study.id)
                .where(Series.id == recorded_series)
            ).scalar_one()
            raise UIDConflict("SOP Instance UID already recorded in another series", other)
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == item.sop_instance_uid)
            .values(
                receive_count=Instance.receive_count + 1,
                received_at=now,
                path=item.path,
                size_bytes=item.size_bytes,
                transfer_syntax_uid=item.transfer_syntax_uid,
            )
        )
    audit.insert(
        session,
        EventType.INSTANCE_STORED,
        item.calling_ae,
        study_instance_uid=item.study_instance_uid,
        sop_instance_uid=item.sop_instance_uid,
        duplicate=not is_new,
        size_bytes=item.size_bytes,
        association=item.association_id,
    )
    return is_new


def is_own_object(session: Session, sop_instance_uid: str) -> bool:
    """True if we produced this object (it is in our outbox): it came back to us."""
    return (
        session.execute(
            select(OutboxItem.id).where(OutboxItem.sop_instance_uid == sop_instance_uid).limit(1)
        ).first()
        is not None
    )


def record_ancillary(
    session: Session,
    item: StoredInstance,
    reason: str,
    *,
    stored: bool,
    now: datetime | None = None,
) -> bool:
    """Record an object that is kept (or dropped) but never analysed; True when new.

    It touches no study, series or job: a non-image object, or our own SR
    routed back by the PACS, must not re-open a study (the loop guard).
    """
    now = now or utcnow()
    image = session.execute(
        select(Instance.id).where(Instance.sop_instance_uid == item.sop_instance_uid)
    ).first()
    if image is not None:
        other = session.execute(
            select(Study.study_instance_uid)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(Instance.sop_instance_uid == item.sop_instance_uid)
        ).scalar_one()
        raise UIDConflict("SOP Instance UID already recorded for an image", other)
    recorded = session.execute(
        select(AncillaryInstance.study_instance_uid, AncillaryInstance.series_instance_uid).where(
            AncillaryInstance.sop_instance_uid == item.sop_instance_uid
        )
    ).first()
    if recorded is not None and (
        recorded.study_instance_uid != item.study_instance_uid
        or recorded.series_instance_uid != item.series_instance_uid
    ):
        raise UIDConflict(
            "SOP Instance UID already recorded in another series", recorded.study_instance_uid
        )
    values = {
        "sop_class_uid": item.sop_class_uid,
        "transfer_syntax_uid": item.transfer_syntax_uid,
        "path": item.path if stored else None,
        "size_bytes": item.size_bytes,
        "received_at": now,
        "calling_ae": item.calling_ae,
        "reason": reason,
    }
    if recorded is None:
        is_new = _insert_ignore(
            session,
            AncillaryInstance.__table__,
            {
                "study_instance_uid": item.study_instance_uid,
                "series_instance_uid": item.series_instance_uid,
                "sop_instance_uid": item.sop_instance_uid,
                "receive_count": 1,
                **values,
            },
            "sop_instance_uid",
        )
    else:
        is_new = False
    if not is_new:
        session.execute(
            update(AncillaryInstance)
            .where(AncillaryInstance.sop_instance_uid == item.sop_instance_uid)
            .values(receive_count=AncillaryInstance.receive_count + 1, **values)
        )
    audit.record(
        session,
        EventType.INSTANCE_IGNORED,
        item.calling_ae,
        study_instance_uid=item.study_instance_uid,
        sop_instance_uid=item.sop_instance_uid,
        sop_class_uid=item.sop_class_uid,
        reason=reason,
        stored=stored,
        duplicate=not is_new,
        size_bytes=item.size_bytes,
        association=item.association_id,
    )
    return is_new


def known_instance_paths(session: Session) -> set[str]:
    return set(session.scalars(select(Instance.path)))
