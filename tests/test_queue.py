"""The analysis queue (db/queue.py) and results store (db/results.py), SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from db import audit
from db.audit import EventType
from db.models import AnalysisRun, FindingRecord, Job, JobState, ReportState, utcnow
from db.queue import (
    LeaseLost,
    RetryPolicy,
    claim_next,
    fail_attempt,
    finish_job,
    release_job,
    renew_lease,
    requeue_expired,
    study_series_files,
)
from db.results import load_run_result
from db.session import Database
from model.results import (
    AnalysisResult,
    Finding,
    ImageLocation,
    Outcome,
    SaliencyMap,
)
from tests.analysers import ALGORITHM, LUNG, NODULE
from tests.workers import WorkerProcess, queue_studies, wait_for

LEASE = 60.0


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _result(uid: str, outcome: Outcome = Outcome.ANALYSED, **kw: Any) -> AnalysisResult:
    return AnalysisResult(
        study_instance_uid=uid,
        series_instance_uid=f"{uid}.1",
        outcome=outcome,
        algorithm=ALGORITHM if outcome == Outcome.ANALYSED else None,
        **kw,
    )


def test_claims_are_exclusive_and_a_lost_lease_fences_the_old_worker(db: Database) -> None:
    (uid,) = queue_studies(db, 1)
    t0 = utcnow()
    with db.session() as s:
        a = claim_next(s, "worker-a", lease_seconds=10, now=t0)
    assert a is not None and a.attempt == 1 and a.study_instance_uid == uid
    with db.session() as s:
        assert claim_next(s, "worker-b", lease_seconds=10, now=t0) is None
    with db.session() as s:
        assert renew_lease(s, a, lease_seconds=10, now=t0 + timedelta(seconds=5))
    # Renewed to t0+15: not expired at t0+12, expired at t0+16.
    policy = RetryPolicy(max_attempts=3, backoff_seconds=0)
    with db.session() as s:
        assert requeue_expired(s, policy, actor="test", now=t0 + timedelta(seconds=12)) == []
    with db.session() as s:
        assert requeue_expired(s, policy, actor="test", now=t0 + timedelta(seconds=16)) == [
            a.job_id
        ]
    job = _job(db, a.job_id)
    assert (job.state, job.attempts, job.lease_owner) == (JobState.QUEUED, 1, None)
    assert job.last_error is not None and "worker-a" in job.last_error

    with db.session() as s:
        b = claim_next(s, "worker-b", lease_seconds=10, now=t0 + timedelta(seconds=17))
    assert b is not None and b.job_id == a.job_id and b.attempt == 2
    # The old worker comes back to life: it can neither renew nor record anything.
    with db.session() as s:
        assert not renew_lease(s, a, lease_seconds=10)
    with pytest.raises(LeaseLost), db.session() as s:
        finish_job(s, a, [_result(uid)], state_dir=Path("/nonexistent"))
    with pytest.raises(LeaseLost), db.session() as s:
        fail_attempt(s, a, "late failure", policy)
    with db.session() as s:
        assert finish_job(s, b, [_result(uid)], state_dir=Path("/nonexistent")) == JobState.DONE
        assert s.query(AnalysisRun).count() == 1
        expired = audit.events(s, EventType.JOB_LEASE_EXPIRED)
        assert [(e.detail["job_id"], e.detail["gave_up"]) for e in expired] == [(a.job_id, False)]
    job = _job(db, a.job_id)
    assert (job.state, job.attempts, job.lease_owner, job.lease_expires_at) == (
        JobState.DONE,
        2,
        None,
        None,
    )


def test_failed_attempts_back_off_exponentially_then_fail(db: Database) -> None:
    (uid,) = queue_studies(db, 1)
    policy = RetryPolicy(max_attempts=3, backoff_seconds=10, backoff_max_seconds=3600)
    now = utcnow()
    for attempt, delay in ((1, 10), (2, 20)):
        with db.session() as s:
            job = claim_next(s, "w", lease_seconds=LEASE, now=now)
        assert job is not None and job.attempt == attempt
        with db.session() as s:
            assert fail_attempt(s, job, f"boom {attempt}", policy, now=now) == JobState.QUEUED
        row = _job(db, job.job_id)
        assert row.not_before == now + timedelta(seconds=delay)
        assert row.last_error == f"boom {attempt}" and row.lease_owner is None
        with db.session() as s:
            early = now + timedelta(seconds=delay - 0.5)
            assert claim_next(s, "w", lease_seconds=LEASE, now=early) is None
        now += timedelta(seconds=delay)
    with db.session() as s:
        job = claim_next(s, "w", lease_seconds=LEASE, now=now)
    assert job is not None and job.attempt == 3
    with db.session() as s:
        assert fail_attempt(s, job, "boom 3", policy, now=now) == JobState.FAILED
    row = _job(db, job.job_id)
    assert (row.state, row.attempts, row.last_error) == (JobState.FAILED, 3, "boom 3")
    with db.session() as s:
        assert claim_next(s, "w", lease_seconds=LEASE, now=now + timedelta(days=1)) is None
        retried = audit.events(s, EventType.JOB_ATTEMPT_FAILED)
        failed = audit.events(s, EventType.JOB_FAILED)
    # Every attempt's error is on record, not only the last one.
    assert [e.detail["error"] for e in retried] == ["boom 1", "boom 2"]
    assert [e.detail["error"] for e in failed] == ["boom 3"]
    assert all(e.study_instance_uid == uid for e in retried + failed)


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=50, backoff_seconds=30, backoff_max_seconds=600)
    assert [policy.delay(n).total_seconds() for n in (1, 2, 3, 5, 40)] == [30, 60, 120, 480, 600]


def test_a_worker_that_keeps_dying_ends_failed(db: Database) -> None:
    queue_studies(db, 1)
    policy = RetryPolicy(max_attempts=2, backoff_seconds=0)
    now = utcnow()
    for _ in range(2):
        with db.session() as s:
            job = claim_next(s, "doomed", lease_seconds=1, now=now)
        assert job is not None
        now += timedelta(seconds=2)
        with db.session() as s:
            assert requeue_expired(s, policy, actor="test", now=now) == [job.job_id]
    row = _job(db, job.job_id)
    assert (row.state, row.attempts) == (JobState.FAILED, 2)
    assert row.last_error is not None and "doomed" in row.last_error
    with db.session() as s:
        assert [e.detail["gave_up"] for e in audit.events(s, EventType.JOB_LEASE_EXPIRED)] == [
            False,
            True,
        ]
        assert len(audit.events(s, EventType.JOB_FAILED)) == 1


def test_release_returns_the_job_without_counting_the_attempt(db: Database) -> None:
    queue_studies(db, 1)
    with db.session() as s:
        job = claim_next(s, "stopping", lease_seconds=LEASE)
    assert job is not None
    with db.session() as s:
        assert release_job(s, job)
    row = _job(db, job.job_id)
    assert (row.state, row.attempts, row.lease_owner, row.lease_expires_at) == (
        JobState.QUEUED,
        0,
        None,
        None,
    )
    with db.session() as s:
        assert not release_job(s, job)  # not ours any more: nothing happens
        again = claim_next(s, "other", lease_seconds=LEASE)
        assert again is not None and again.attempt == 1
        assert len(audit.events(s, EventType.JOB_RELEASED)) == 1


def test_results_are_recorded_and_read_back(db: Database, tmp_path: Path) -> None:
    (uid,) = queue_studies(db, 1)
    with db.session() as s:
        job = claim_next(s, "w", lease_seconds=LEASE)
        assert job is not None
        files = study_series_files(s, job.study_id)
    assert [(f.series_instance_uid, f.modality, len(f.paths)) for f in files] == [
        (f"{uid}.1", "CT", 1)
    ]
    sop = f"{uid}.1.1"
    frames = np.zeros((2, 8, 8), dtype=np.float32)
    frames[1, 3, 4] = 0.9
    result = _result(
        uid,
        findings=[
            Finding(
                "nodule",
                NODULE,
                LUNG,
                0.875,
                0.5,
                ImageLocation(sop, "1.2.840.10008.5.1.4.1.1.2", (4.0, 3.0), (2.0, 1.0, 6.0, 5.0)),
            )
        ],
        saliency=SaliencyMap(f"{uid}.1", [f"{sop}.0", sop], frames),
        provenance=[{"step": "resample", "spacing": (np.float32(1.5), 2.0), "ms": np.int64(7)}],
    )
    with db.session() as s:
        assert finish_job(s, job, [result], state_dir=tmp_path) == JobState.DONE
    with db.session() as s:
        run = s.query(AnalysisRun).one()
        finding = s.query(FindingRecord).one()
        assert (run.outcome, run.report_state, run.model_name) == (
            "analysed",
            ReportState.PENDING,
            "test-recorder",
        )
        assert run.saliency_path == f"saliency/{uid}/run-{run.id}.npz"
        assert (tmp_path / run.saliency_path).is_file()
        assert run.provenance["steps"] == [{"step": "resample", "spacing": [1.5, 2.0], "ms": 7}]
        assert finding.present and finding.point == {"col": 4.0, "row": 3.0}
        assert finding.finding_code == {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}
        back = load_run_result(s, run.id, state_dir=tmp_path)
        (recorded,) = audit.events(s, EventType.ANALYSIS_RECORDED)
        assert recorded.detail["findings"] == [
            {"label": "nodule", "probability": 0.875, "present": True}
        ]
    assert back.algorithm == ALGORITHM
    assert back.findings == result.findings
    assert back.provenance == [{"step": "resample", "spacing": [1.5, 2.0], "ms": 7}]
    assert back.saliency is not None and result.saliency is not None
    assert back.saliency.source_sop_instance_uids == result.saliency.source_sop_instance_uids
    np.testing.assert_array_equal(back.saliency.frames, frames)


def test_job_state_follows_the_outcomes(db: Database, tmp_path: Path) -> None:
    uids = queue_studies(db, 3)
    why = "ct-nodule is for CT, not modality MR"
    outcomes = {
        uids[0]: [_result(uids[0], Outcome.NOT_APPLICABLE, reason=why)],
        # QC failure: the job is done (retrying won't add the missing slices).
        uids[1]: [_result(uids[1], Outcome.FAILED_QC, reason="2 slices missing")],
        uids[2]: [_result(uids[2], Outcome.NOT_APPLICABLE, reason=why), _result(uids[2])],
    }
    states = {}
    for _ in uids:
        with db.session() as s:
            job = claim_next(s, "w", lease_seconds=LEASE)
            assert job is not None
            states[job.study_instance_uid] = finish_job(
                s, job, outcomes[job.study_instance_uid], state_dir=tmp_path
            )
    assert states == {
        uids[0]: JobState.NOT_APPLICABLE,
        uids[1]: JobState.DONE,
        uids[2]: JobState.DONE,
    }
    with db.session() as s:
        runs = s.query(AnalysisRun).order_by(AnalysisRun.id).all()
        assert [(r.outcome, r.reason) for r in runs] == [
            ("not_applicable", why),
            ("failed_qc", "2 slices missing"),
            ("not_applicable", why),
            ("analysed", None),
        ]
        assert {r.report_state for r in runs} == {ReportState.PENDING}
    # An analyser that returns nothing is a bug, not a silent "done".
    queue_studies(db, 1, prefix="1.2.3.999")
    with pytest.raises(ValueError, match="at least one result"), db.session() as s:
        job = claim_next(s, "w", lease_seconds=LEASE)
        assert job is not None
        finish_job(s, job, [], state_dir=tmp_path)


def test_four_worker_processes_take_every_job_exactly_once(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    analysed = tmp_path / "analysed.txt"
    workers = [
        WorkerProcess(
            tmp_path / "workers",
            db_url,
            name=f"w{i}",
            env={
                "SECONDREADER_TEST_ANALYSER_LOG": str(analysed),
                "SECONDREADER_TEST_ANALYSER_SLEEP": "0",
                # Each worker's first job waits until all four hold one: sharing
                # is then guaranteed, not left to the scheduler.
                "SECONDREADER_TEST_ANALYSER_RENDEZVOUS": "4",
            },
        ).start()
        for i in range(4)
    ]
    try:
        for w in workers:
            w.wait_ready()
        uids = queue_studies(db, 40)

        def all_done() -> bool:
            with db.session() as s:
                return s.query(Job).filter(Job.state == JobState.DONE).count() == 40

        wait_for(all_done, 60, "40 jobs done")
        for w in workers:
            w.signal(15)
        assert [w.wait() for w in workers] == [0, 0, 0, 0]
    finally:
        for w in workers:
            w.kill()
    lines = [line.split() for line in analysed.read_text().splitlines()]
    # Each study analysed once, by exactly one process, and recorded once.
    assert Counter(uid for uid, _ in lines) == Counter({uid: 1 for uid in uids})
    by_worker = Counter(pid for _, pid in lines)
    assert set(by_worker) <= {str(w.pid) for w in workers}
    assert len(by_worker) == 4, f"the queue was not shared: {by_worker}"
    with db.session() as s:
        jobs = s.query(Job).all()
        assert sorted(j.attempts for j in jobs) == [1] * 40
        assert all(j.lease_owner is None and j.last_error is None for j in jobs)
        runs = s.query(AnalysisRun).all()
        assert Counter(r.job_id for r in runs) == Counter({j.id: 1 for j in jobs})
        # The run names the process that did the job, the same one that logged it.
        pid_of = {f"{uid}.1": pid for uid, pid in lines}  # series UID -> process
        for r in runs:
            assert str(r.provenance["steps"][0]["pid"]) == pid_of[r.series_instance_uid]
        assert len(audit.events(s, EventType.JOB_CLAIMED)) == 40
    db.dispose()
