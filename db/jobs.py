"""The analysis queue: jobs taken under a lease, and the results they leave behind.

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

import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import String, func, literal, select, update
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    FindingRecord,
    Instance,
    Job,
    JobState,
    ReportState,
    RunOutcome,
    Series,
    Study,
    utcnow,
)
from db.notify import RUNS, notify
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
    SaliencyMap,
)

ANALYSE = "analyse"
SALIENCY_DIR = "saliency"
# Errors are stored and audited; a traceback-sized message is enough.
MAX_ERROR_CHARS = 2000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


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
    changed = session.execute(
        _ours(job)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount
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
    run_ids = [_record_run(session, job, r, state_dir, now) for r in results]
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
        outcome=RunOutcome.FAILED,
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
        outcome=RunOutcome.FAILED,
        reason=run.reason,
    )


def release_job(session: Session, job: ClaimedJob, *, now: datetime | None = None) -> bool:
    """Give a running job back to the queue (worker stopping); the attempt is not counted.

    False when the job was no longer ours, e.g. it finished meanwhile.
    """
    now = now or utcnow()
    changed = session.execute(
        _ours(job)
        .values(
            state=JobState.QUEUED,
            attempts=Job.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
            not_before=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
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


def load_run_result(
    session: Session, run_id: int, *, state_dir: Path, saliency: bool = True
) -> AnalysisResult:
    """An AnalysisRun read back as the AnalysisResult it was recorded from (report stage).

    `saliency=False` leaves the saliency map on disk (None in the result): the
    SR does not need it, and a whole-series map takes a second to read.
    """
    run = session.get(AnalysisRun, run_id)
    if run is None:
        raise KeyError(f"no analysis run {run_id}")
    study_uid = session.execute(
        select(Study.study_instance_uid).where(Study.id == run.study_id)
    ).scalar_one()
    algorithm = None
    if run.model_name is not None:
        extra = run.provenance.get("algorithm", {})
        algorithm = AlgorithmInfo(
            name=run.model_name,
            version=run.model_version or "",
            manufacturer=str(extra.get("manufacturer", "")),
            device_uid=run.model_device_uid or "",
            parameters={str(k): str(v) for k, v in extra.get("parameters", {}).items()},
        )
    findings = [_finding_from_record(f) for f in sorted(run.findings, key=lambda f: f.id)]
    saliency_map = (
        read_saliency(state_dir / run.saliency_path) if run.saliency_path and saliency else None
    )
    return AnalysisResult(
        study_instance_uid=study_uid,
        series_instance_uid=run.series_instance_uid,
        outcome=Outcome(run.outcome),
        algorithm=algorithm,
        findings=findings,
        reason=run.reason,
        saliency=saliency_map,
        provenance=list(run.provenance.get("steps", [])),
    )


def read_saliency(path: Path) -> SaliencyMap:
    """A saliency map as `finish_job` wrote it."""
    with np.load(path, allow_pickle=False) as npz:
        frame_numbers = npz.get("source_frame_numbers")
        return SaliencyMap(
            series_instance_uid=str(npz["series_instance_uid"]),
            source_sop_instance_uids=[str(u) for u in npz["source_sop_instance_uids"]],
            frames=npz["frames"].astype(np.float32),
            source_frame_numbers=None if frame_numbers is None else frame_numbers.tolist(),
        )


# -- internals ---------------------------------------------------------------


def _ours(job: ClaimedJob) -> Any:
    return update(Job).where(
        Job.id == job.job_id, Job.state == JobState.RUNNING, Job.lease_owner == job.owner
    )


def _fence(session: Session, job: ClaimedJob) -> None:
    """A no-op write that proves the lease is still ours and locks the row (SQLite: the file)."""
    changed = session.execute(
        _ours(job).values(lease_owner=job.owner).execution_options(synchronize_session=False)
    ).rowcount
    if not changed:
        raise LeaseLost(f"job {job.job_id} is no longer leased to {job.owner}")


def _record_run(
    session: Session, job: ClaimedJob, result: AnalysisResult, state_dir: Path, now: datetime
) -> int:
    algo = result.algorithm
    provenance: dict[str, Any] = {
        "steps": _jsonable(result.provenance),
        "job": {"id": job.job_id, "attempt": job.attempt, "worker": job.owner},
    }
    if algo is not None:
        # AnalysisRun has columns for name, version and device UID; the rest
        # of AlgorithmInfo lives here so the report stage can rebuild it.
        provenance["algorithm"] = {
            "manufacturer": algo.manufacturer,
            "parameters": dict(algo.parameters),
        }
    run = AnalysisRun(
        job_id=job.job_id,
        study_id=job.study_id,
        outcome=str(result.outcome),
        reason=result.reason,
        model_name=algo.name if algo else None,
        model_version=algo.version if algo else None,
        model_device_uid=algo.device_uid if algo else None,
        series_instance_uid=result.series_instance_uid,
        provenance=provenance,
        created_at=now,
        report_state=ReportState.PENDING,
    )
    session.add(run)
    session.flush()
    if result.saliency is not None:
        run.saliency_path = _write_saliency(state_dir, job.study_instance_uid, run.id, result)
    for f in result.findings:
        loc = f.location
        session.add(
            FindingRecord(
                run_id=run.id,
                label=f.label,
                finding_code=_code(f.finding_type),
                site_code=_code(f.finding_site),
                probability=float(f.probability),
                threshold=float(f.threshold),
                present=bool(f.present),
                sop_instance_uid=loc.sop_instance_uid if loc else None,
                sop_class_uid=loc.sop_class_uid if loc else None,
                frame_number=loc.frame_number if loc else None,
                point=_point(loc.point) if loc else None,
                box=_box(loc.box) if loc and loc.box else None,
            )
        )
    session.flush()
    audit.record(
        session,
        EventType.ANALYSIS_RECORDED,
        job.owner,
        study_instance_uid=job.study_instance_uid,
        job_id=job.job_id,
        run_id=run.id,
        outcome=str(result.outcome),
        reason=result.reason,
        series_instance_uid=result.series_instance_uid,
        model=f"{algo.name} {algo.version}" if algo else None,
        findings=[
            {"label": f.label, "probability": round(float(f.probability), 4), "present": f.present}
            for f in result.findings
        ],
        # Provenance: each preprocessing step with its parameters and timing.
        preprocessing=[
            {"name": step.get("name"), "parameters": step.get("parameters")}
            for step in result.provenance
        ],
    )
    return run.id


def _write_saliency(state_dir: Path, study_uid: str, run_id: int, result: AnalysisResult) -> str:
    """Write <state_dir>/saliency/<study UID>/run-<id>.npz atomically; returns the relative path.

    Written inside the run's transaction: if that rolls back, an orphan file
    stays behind, which is harmless; a committed run never lacks its file.
    """
    sal = result.saliency
    assert sal is not None
    if not _UID.match(study_uid):
        raise ValueError("not a valid study UID; refusing to build a path from it")
    frames = np.asarray(sal.frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] != len(sal.source_sop_instance_uids):
        raise ValueError("saliency frames must be (n, rows, cols), one per source image")
    relative = f"{SALIENCY_DIR}/{study_uid}/run-{run_id}.npz"
    target = state_dir / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "frames": frames,
        "series_instance_uid": np.array(sal.series_instance_uid),
        "source_sop_instance_uids": np.array(sal.source_sop_instance_uids, dtype=str),
    }
    if sal.source_frame_numbers is not None:
        arrays["source_frame_numbers"] = np.asarray(sal.source_frame_numbers, dtype=np.int32)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return relative


def _code(c: CodedConcept) -> dict[str, str]:
    return {"value": c.value, "scheme": c.scheme_designator, "meaning": c.meaning}


def _concept(d: Mapping[str, Any]) -> CodedConcept:
    return CodedConcept(str(d["value"]), str(d["scheme"]), str(d["meaning"]))


def _point(p: tuple[float, float]) -> dict[str, float]:
    return {"col": float(p[0]), "row": float(p[1])}


def _box(b: tuple[float, float, float, float]) -> dict[str, float]:
    return {"col0": float(b[0]), "row0": float(b[1]), "col1": float(b[2]), "row1": float(b[3])}


def _finding_from_record(f: FindingRecord) -> Finding:
    location = None
    if f.sop_instance_uid is not None and f.point is not None:
        box = f.box
        location = ImageLocation(
            sop_instance_uid=f.sop_instance_uid,
            sop_class_uid=f.sop_class_uid or "",
            point=(float(f.point["col"]), float(f.point["row"])),
            box=(box["col0"], box["row0"], box["col1"], box["row1"]) if box else None,
            frame_number=f.frame_number,
        )
    return Finding(
        label=f.label,
        finding_type=_concept(f.finding_code),
        finding_site=_concept(f.site_code),
        probability=f.probability,
        threshold=f.threshold,
        location=location,
    )


def _jsonable(value: Any) -> Any:
    """Provenance as JSON: numpy scalars and arrays, tuples and paths made plain."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


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


def recent_workers(session: Session, since: datetime) -> list[tuple[str, str, int]]:
    """(worker, device, runs) of the workers that recorded analyses since `since`."""
    seen: dict[tuple[str, str], int] = {}
    for provenance in session.scalars(
        select(AnalysisRun.provenance).where(AnalysisRun.created_at >= since)
    ):
        worker = str((provenance or {}).get("job", {}).get("worker", ""))
        device = next(
            (
                str(step.get("parameters", {}).get("device", ""))
                for step in (provenance or {}).get("steps", [])
                if isinstance(step, dict) and step.get("name") == "inference"
            ),
            "",
        )
        if worker:
            seen[(worker, device)] = seen.get((worker, device), 0) + 1
    return [(w, d, n) for (w, d), n in sorted(seen.items())]
