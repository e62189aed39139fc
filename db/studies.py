"""Study completion and the queries `secondreader status` shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    DeliveryState,
    Instance,
    Job,
    JobState,
    PerformedProcedureStep,
    ReportState,
    Series,
    Study,
    StudyState,
    utcnow,
)
from db.notify import JOBS, notify
from db.session import changed_rows
from dicom_io import mpps


@dataclass(frozen=True)
class CompletedStudy:
    study_id: int
    study_instance_uid: str
    job_id: int
    forced: bool


def complete_stable_studies(
    session: Session,
    *,
    stable_seconds: float,
    max_seconds: float,
    now: datetime | None = None,
) -> list[CompletedStudy]:
    """Mark complete every study quiet for `stable_seconds` (or receiving for `max_seconds`).

    Each completion queues one analysis job, unless one is still waiting in the
    queue for the same study (a re-opened study then needs no second job).
    """
    now = now or utcnow()
    quiet_before = now - timedelta(seconds=stable_seconds)
    forced_before = now - timedelta(seconds=max_seconds)
    candidates = session.execute(
        select(Study.id, Study.study_instance_uid, Study.last_received_at, Study.receiving_since)
        .where(Study.state == StudyState.RECEIVING)
        .where(or_(Study.last_received_at <= quiet_before, Study.receiving_since <= forced_before))
    ).all()
    done: list[CompletedStudy] = []
    for study_id, uid, last_received_at, _since in candidates:
        forced = last_received_at > quiet_before
        completed = _complete(
            session, study_id, uid, last_received_at, now, "time limit" if forced else "quiet"
        )
        if completed is not None:
            done.append(completed)
    return done


def next_stable_due(
    session: Session, *, stable_seconds: float, max_seconds: float
) -> datetime | None:
    """When the next receiving study falls due (quiet window or time limit); naive UTC.

    None when no study is receiving. An instance arriving meanwhile moves
    its study's time later: the completer then simply finds nothing yet.
    """
    quiet, forced = session.execute(
        select(func.min(Study.last_received_at), func.min(Study.receiving_since)).where(
            Study.state == StudyState.RECEIVING
        )
    ).one()
    due = [
        t + timedelta(seconds=wait)
        for t, wait in ((quiet, stable_seconds), (forced, max_seconds))
        if t is not None
    ]
    return min(due) if due else None


def complete_by_mpps(session: Session, now: datetime | None = None) -> list[CompletedStudy]:
    """Complete each receiving study whose COMPLETED MPPS lists only instances we have.

    A step completes its study once (`used_at`). A DISCONTINUED step, or a
    COMPLETED one with an instance still missing, completes nothing: the
    quiet window does, as without MPPS.
    """
    now = now or utcnow()
    steps = session.scalars(
        select(PerformedProcedureStep).where(
            PerformedProcedureStep.status == mpps.COMPLETED,
            PerformedProcedureStep.used_at.is_(None),
            PerformedProcedureStep.study_instance_uid.is_not(None),
        )
    ).all()
    done: list[CompletedStudy] = []
    for step in steps:
        study = session.execute(
            select(Study.id, Study.state, Study.last_received_at).where(
                Study.study_instance_uid == step.study_instance_uid
            )
        ).one_or_none()
        if study is None:
            continue  # nothing arrived yet
        listed = set(step.instance_uids)
        have = set(
            session.scalars(
                select(Instance.sop_instance_uid)
                .join(Series)
                .where(Series.study_id == study.id, Instance.sop_instance_uid.in_(listed))
            )
        )
        if not listed or have != listed:
            continue
        step.used_at = now
        if study.state != StudyState.RECEIVING:
            continue  # the quiet window was first
        completed = _complete(
            session, study.id, str(step.study_instance_uid), study.last_received_at, now, "mpps"
        )
        if completed is not None:
            done.append(completed)
    return done


def _complete(
    session: Session,
    study_id: int,
    uid: str,
    last_received_at: datetime,
    now: datetime,
    by: str,
) -> CompletedStudy | None:
    """Mark one study complete and queue its job; None if an instance arrived meanwhile."""
    # Conditional on what we read: an instance that arrived meanwhile wins.
    changed = changed_rows(
        session,
        update(Study)
        .where(
            Study.id == study_id,
            Study.state == StudyState.RECEIVING,
            Study.last_received_at == last_received_at,
        )
        .values(
            state=StudyState.COMPLETE,
            completed_at=now,
            completion_count=Study.completion_count + 1,
        )
    )
    if not changed:
        return None
    n_instances = session.execute(
        select(func.count(Instance.id)).join(Series).where(Series.study_id == study_id)
    ).scalar_one()
    audit.record(
        session,
        EventType.STUDY_COMPLETED,
        "completer",
        study_instance_uid=uid,
        instances=n_instances,
        forced=by == "time limit",
        by=by,
    )
    job_id = session.execute(
        select(Job.id).where(Job.study_id == study_id, Job.state == JobState.QUEUED)
    ).scalar()
    if job_id is None:
        job = Job(
            study_id=study_id,
            kind="analyse",
            state=JobState.QUEUED,
            attempts=0,
            not_before=now,
            created_at=now,
        )
        session.add(job)
        session.flush()
        job_id = job.id
        audit.record(
            session, EventType.JOB_QUEUED, "completer", study_instance_uid=uid, job_id=job_id
        )
        notify(session, JOBS)  # workers of other processes look at once (PostgreSQL)
    return CompletedStudy(study_id, uid, job_id, by == "time limit")


def study_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    return {state: n for state, n in rows}


def job_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: n for state, n in rows}


def get_study(session: Session, study_instance_uid: str) -> Study | None:
    return session.execute(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).scalar_one_or_none()


def study_instances(session: Session, study_instance_uid: str) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance)
            .join(Series)
            .join(Study)
            .where(Study.study_instance_uid == study_instance_uid)
            .order_by(Instance.id)
        )
    )


def pipeline_counts(session: Session) -> dict[str, dict[str, int]]:
    """Studies, jobs, reports and outbox rows by state: `status`, /metrics and the web page."""
    from db.outbox import outbox_counts
    from db.reports import report_counts

    counts = {
        "studies": study_counts(session),
        "jobs": job_counts(session),
        "reports": report_counts(session),
        "outbox": outbox_counts(session),
    }
    # Every state, zero included: a dashboard shows 0, not "no data".
    for name, states in ALL_STATES.items():
        counts[name] = {**dict.fromkeys(states, 0), **counts[name]}
    return counts


def _states(cls: type[StrEnum]) -> tuple[str, ...]:
    return tuple(str(state) for state in cls)


ALL_STATES = {
    "studies": _states(StudyState),
    "jobs": _states(JobState),
    "reports": _states(ReportState),
    "outbox": _states(DeliveryState),
}
