"""The analysis queue: jobs taken under a lease (their results: db/results.py).

A job moves like this (the lease is `lease_owner` + `lease_expires_at`):

    queued --claim_next--> running --finish_job----> done / not_applicable
                              |----fail_attempt--> queued after a backoff / failed
                              |----release_job---> queued, attempt not counted
                              '----lease expires, requeue_expired--> queued / failed

`attempts` counts claims, so an attempt whose worker died still counts.
Every way out of `running` is conditional on the lease owner: a worker whose
lease expired and was taken over cannot overwrite what its successor does.

SQLite: every transaction here that writes starts with its write. A read
before the first write runs outside the transaction (pysqlite only opens one
at the first DML statement), so checks are folded into conditional UPDATEs;
once the first UPDATE holds the write lock, later reads are consistent.
PostgreSQL: the claim is `FOR UPDATE SKIP LOCKED`, so concurrent claimers
skip each other's rows instead of queueing behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import String, func, literal, select, update
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    Instance,
    Job,
    JobState,
    ReportState,
    Series,
    Study,
    StudyState,
    utcnow,
)
from db.notify import RUNS, notify
from db.results import record_run
from db.session import changed_rows
from model.results import (
    AnalysisResult,
    Outcome,
)

ANALYSE = "analyse"
# Errors are stored and audited; a traceback-sized message is enough.
MAX_ERROR_CHARS = 2000


class LeaseLost(Exception):
    """The job is no longer running under this owner (expired and taken over, or released)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        """Backoff after the `attempts`-th failed attempt: base * 2**(attempts - 1), capped."""
        exponent = min(max(attempts - 1, 0), 32)
        return timedelta(seconds=min(self.backoff_seconds * 2**exponent, self.backoff_max_seconds))


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    study_id: int
    study_instance_uid: str
    attempt: int  # 1 for the first try
    owner: str


@dataclass(frozen=True)
class SeriesFiles:
    series_instance_uid: str
    modality: str | None
    paths: list[str]  # relative to the spool root, in order of arrival


def claim_next(
    session: Session,
    owner: str,
    *,
    lease_seconds: float,
    kind: str = ANALYSE,
    now: datetime | None = None,
) -> ClaimedJob | None:
    """Take the oldest due queued job for `owner`, or None. Must open its transaction.

    One UPDATE with the choice in a subquery: on PostgreSQL the subquery locks
    its row FOR UPDATE SKIP LOCKED; on SQLite the statement holds the write
    lock from its start. Either way two claimers never get the same job.
    """
    now = now or utcnow()
    candidate = (
        select(Job.id)
        .where(Job.state == JobState.QUEUED, Job.kind == kind, Job.not_before <= now)
        .order_by(Job.not_before, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Job)
        .where(Job.id == candidate, Job.state == JobState.QUEUED)
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
        )
        .returning(Job.id, Job.study_id, Job.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    job_id, study_id, attempts = row
    study_uid = session.execute(
        select(Study.study_instance_uid).where(Study.id == study_id)
    ).scalar_one()
    audit.record(
        session,
        EventType.JOB_CLAIMED,
        owner,
        study_instance_uid=study_uid,
        job_id=job_id,
        attempt=attempts,
    )
    return ClaimedJob(job_id, study_id, study_uid, attempts, owner)


def renew_lease(
    session: Session, job: ClaimedJob, *, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Heartbeat: extend the lease; False when it is no longer ours."""
    now = now or utcnow()
    changed = changed_rows(
        session,
        _ours(job)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(changed)


def study_series_files(session: Session, study_id: int) -> list[SeriesFiles]:
    """The study's instances as spool paths, grouped by series (in order of arrival)."""
    removed = session.execute(
        select(Study.files_removed_at).where(Study.id == study_id)
    ).scalar_one_or_none()
    query = (
        select(Series.series_instance_uid, Series.modality, Instance.path)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.id, Instance.id)
    )
    if removed is not None:
        # Retention removed the files of what came before; a re-opened study
        # is analysed on what it received since.
        query = query.where(Instance.received_at > removed)
    rows = session.execute(query).all()
    grouped: dict[str, SeriesFiles] = {}
    for series_uid, modality, path in rows:
        entry = grouped.setdefault(series_uid, SeriesFiles(series_uid, modality, []))
        entry.paths.append(path)
    return list(grouped.values())


def finish_job(
    session: Session,
    job: ClaimedJob,
    results: Sequence[AnalysisResult],
    *,
    state_dir: Path,
    now: datetime | None = None,
) -> str:
    """Record the results (AnalysisRun + FindingRecord rows, saliency files); returns the state.

    Raises LeaseLost (and writes nothing to the database) when the job is no
    longer ours. A study with at least one analysed series is `done`; one
    where no model applied anywhere is `not_applicable`; a failed QC is
    `done` too: the run says why, and retrying would not add the missing slices.
    """
    if not results:
        raise ValueError("an analysis must give at least one result, even if only 'not applicable'")
    for r in results:
        if r.study_instance_uid != job.study_instance_uid:
            raise ValueError("an analysis result names another study than its job")
    now = now or utcnow()
    _fence(session, job)
    run_ids = [record_run(session, job, r, state_dir, now) for r in results]
    outcomes = {r.outcome for r in results}
    state = JobState.NOT_APPLICABLE if outcomes == {Outcome.NOT_APPLICABLE} else JobState.DONE
    session.execute(
        update(Job)
        .where(Job.id == job.job_id)
        .values(state=state, finished_at=now, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    audit.record(
        session,
        EventType.JOB_FINISHED,
        job.owner,
        study_instance_uid=job.study_instance_uid,
        job_id=job.job_id,
        attempt=job.attempt,
        state=state,
        run_ids=run_ids,
    )
    notify(session, RUNS)  # the report stage of another process looks at once (PostgreSQL)
    return state


def fail_attempt(
    session: Session,
    job: ClaimedJob,
    error: str,
    policy: RetryPolicy,
    *,
    now: datetime | None = None,
) -> str:
    """Record a failed attempt: queued again after a backoff, or failed for good.

    Returns the new state. Raises LeaseLost when the job is no longer ours
    (whoever holds it now decides its fate).
    """
    now = now or utcnow()
    error = error[:MAX_ERROR_CHARS]
    _fence(session, job)
    attempts = session.execute(select(Job.attempts).where(Job.id == job.job_id)).scalar_one()
    values: dict[str, Any] = {"last_error": error, "lease_owner": None, "lease_expires_at": None}
    if attempts >= policy.max_attempts:
        values.update(state=JobState.FAILED, finished_at=now)
        event = EventType.JOB_FAILED
        retry_at = None
    else:
        retry_at = now + policy.delay(attempts)
        values.update(state=JobState.QUEUED, not_before=retry_at)
        event = EventType.JOB_ATTEMPT_FAILED
    session.execute(
        update(Job)
        .where(Job.id == job.job_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    audit.record(
        session,
        event,
        job.owner,
        study_instance_uid=job.study_instance_uid,
        job_id=job.job_id,
        attempt=attempts,
        error=error,
        retry_at=retry_at.isoformat() if retry_at else None,
    )
    if retry_at is None:
        _record_failed_run(
            session,
            job.job_id,
            job.study_id,
            job.study_instance_uid,
            job.owner,
            attempts,
            error,
            now,
        )
    return str(values["state"])


def _record_failed_run(
    session: Session,
    job_id: int,
    study_id: int,
    study_uid: str,
    actor: str,
    attempts: int,
    error: str,
    now: datetime,
) -> None:
    """A job given up for good: a FAILED run, so the report stage sends the not-run SR.

    The absence of an AI result is never silent.
    """
    run = AnalysisRun(
        job_id=job_id,
        study_id=study_id,
        outcome=Outcome.FAILED,
        reason=f"the AI analysis failed after {attempts} attempt(s): {error}",
        provenance={},
        created_at=now,
        report_state=ReportState.PENDING,
    )
    session.add(run)
    session.flush()
    audit.record(
        session,
        EventType.ANALYSIS_RECORDED,
        actor,
        study_instance_uid=study_uid,
        job_id=job_id,
        run_id=run.id,
        outcome=Outcome.FAILED,
        reason=run.reason,
    )


def release_job(session: Session, job: ClaimedJob, *, now: datetime | None = None) -> bool:
    """Give a running job back to the queue (worker stopping); the attempt is not counted.

    False when the job was no longer ours, e.g. it finished meanwhile.
    """
    now = now or utcnow()
    changed = changed_rows(
        session,
        _ours(job)
        .values(
            state=JobState.QUEUED,
            attempts=Job.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
            not_before=now,
        )
        .execution_options(synchronize_session=False)
    )
    if changed:
        audit.record(
            session,
            EventType.JOB_RELEASED,
            job.owner,
            study_instance_uid=job.study_instance_uid,
            job_id=job.job_id,
            attempt=job.attempt,
        )
    return bool(changed)


def requeue_expired(
    session: Session, policy: RetryPolicy, *, actor: str, now: datetime | None = None
) -> list[int]:
    """Running jobs whose lease expired (worker killed or hung) go back to the queue.

    Their attempt counts: a study that kills its worker each time must end as
    `failed`, not loop forever. Returns the ids of the jobs taken back.
    """
    now = now or utcnow()
    expired = (Job.state == JobState.RUNNING, Job.lease_expires_at < now)
    # Built in SQL: the owner's name is only known to the row being changed.
    why = (
        literal("lease of ", String)
        + func.coalesce(Job.lease_owner, "?")
        + literal(" expired: the worker stopped renewing it (killed or hung)", String)
    )
    cleared = {"lease_owner": None, "lease_expires_at": None, "last_error": why}
    failed = session.execute(
        update(Job)
        .where(*expired, Job.attempts >= policy.max_attempts)
        .values(state=JobState.FAILED, finished_at=now, **cleared)
        .returning(Job.id, Job.study_id, Job.attempts, Job.last_error)
        .execution_options(synchronize_session=False)
    ).all()
    requeued = session.execute(
        update(Job)
        .where(*expired)
        .values(state=JobState.QUEUED, not_before=now, **cleared)
        .returning(Job.id, Job.study_id, Job.attempts, Job.last_error)
        .execution_options(synchronize_session=False)
    ).all()
    for job_id, _study_id, attempts, _error in requeued:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(not_before=now + policy.delay(attempts))
            .execution_options(synchronize_session=False)
        )
    for rows, gave_up in ((failed, True), (requeued, False)):
        for job_id, study_id, attempts, error in rows:
            study_uid = session.execute(
                select(Study.study_instance_uid).where(Study.id == study_id)
            ).scalar_one()
            audit.record(
                session,
                EventType.JOB_LEASE_EXPIRED,
                actor,
                study_instance_uid=study_uid,
                job_id=job_id,
                attempt=attempts,
                error=error,
                gave_up=gave_up,
            )
            if gave_up:
                audit.record(
                    session,
                    EventType.JOB_FAILED,
                    actor,
                    study_instance_uid=study_uid,
                    job_id=job_id,
                    attempt=attempts,
                    error=error,
                    retry_at=None,
                )
                _record_failed_run(
                    session, job_id, study_id, study_uid, actor, attempts, str(error), now
                )
    return [r[0] for r in (*failed, *requeued)]


def _ours(job: ClaimedJob) -> Any:
    return update(Job).where(
        Job.id == job.job_id, Job.state == JobState.RUNNING, Job.lease_owner == job.owner
    )


def _fence(session: Session, job: ClaimedJob) -> None:
    """A no-op write that proves the lease is still ours and locks the row (SQLite: the file)."""
    changed = changed_rows(
        session,
        _ours(job).values(lease_owner=job.owner).execution_options(synchronize_session=False)
    )
    if not changed:
        raise LeaseLost(f"job {job.job_id} is no longer leased to {job.owner}")


def requeue_failed_jobs(session: Session, *, actor: str, now: datetime | None = None) -> int:
    """Jobs that gave up (`worker.max_attempts`) back to the queue with fresh attempts."""
    now = now or utcnow()
    failed = session.execute(
        select(Job.id, Study.study_instance_uid)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.FAILED)
    ).all()
    for job_id, study_uid in failed:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.FAILED)
            .values(
                state=JobState.QUEUED, attempts=0, not_before=now, last_error=None, finished_at=None
            )  # fmt: skip
        )
        audit.record(session, EventType.JOB_REQUEUED, actor, study_instance_uid=study_uid,
                     job_id=job_id)  # fmt: skip
    return len(failed)


def running_jobs(session: Session) -> list[tuple[int, str, str | None]]:
    """(job id, study UID, worker) of the jobs being analysed now."""
    rows = session.execute(
        select(Job.id, Study.study_instance_uid, Job.lease_owner)
        .join(Study, Study.id == Job.study_id)
        .where(Job.state == JobState.RUNNING)
    ).all()
    return [(job_id, uid, owner) for job_id, uid, owner in rows]


@dataclass(frozen=True)
class ArrivingInstance:
    instance_id: int
    study_instance_uid: str
    path: str  # relative to the spool root


def arriving_instances(
    session: Session, *, after_id: int, limit: int = 256
) -> list[ArrivingInstance]:
    """Instances of studies still receiving, newer than `after_id`, oldest first (the streamer).

    Re-sent instances keep their row id: the streamer sees them only if the
    file changed, which the read-ahead notices by itself (model/stream.py).
    """
    rows = session.execute(
        select(Instance.id, Study.study_instance_uid, Instance.path)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.id > after_id, Study.state == StudyState.RECEIVING)
        .order_by(Instance.id)
        .limit(limit)
    ).all()
    return [ArrivingInstance(int(i), str(uid), str(p)) for i, uid, p in rows]
