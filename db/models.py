"""SQLAlchemy models: the tables every stage reads and writes.

Times are naive UTC (`utcnow()`), the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class StudyState:
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    # Start of the current receiving period: the forced-completion clock.
    receiving_since: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    completion_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the spool root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    calling_ae: Mapped[str] = mapped_column(String(16))
    receive_count: Mapped[int] = mapped_column(Integer, default=1)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One unit of queued work on a study (for now: analyse it)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="analyse")
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class AuditEvent(Base):
    """Append-only trail of what happened. Written only through db.audit."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(128))  # AE title, worker id or user
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
