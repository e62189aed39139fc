"""Database layer on both backends: ingest idempotency, completion, re-opening."""

from __future__ import annotations

from datetime import timedelta

from db import audit
from db.audit import EventType
from db.ingest import StoredInstance, record_instance
from db.models import Job, JobState, Study, StudyState, utcnow
from db.session import Database
from db.studies import complete_stable_studies, get_study, next_stable_due, study_instances


def _item(sop: str, study: str = "1.2.3", series: str = "1.2.3.4") -> StoredInstance:
    return StoredInstance(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        path=f"{study}/{series}/{sop}.dcm",
        size_bytes=100,
        calling_ae="MODALITY",
    )


def test_resent_instance_is_idempotent(db_url: str) -> None:
    db = Database(db_url)
    with db.session() as s:
        assert record_instance(s, _item("1.2.3.4.1")) is True
    with db.session() as s:
        assert record_instance(s, _item("1.2.3.4.1")) is False
    with db.session() as s:
        rows = study_instances(s, "1.2.3")
        assert [r.sop_instance_uid for r in rows] == ["1.2.3.4.1"]
        assert rows[0].receive_count == 2
        stored = audit.events(s, EventType.INSTANCE_STORED)
        assert [e.detail["duplicate"] for e in stored] == [False, True]
    db.dispose()


def test_completion_queues_one_job_and_reopens(db_url: str) -> None:
    db = Database(db_url)
    t0 = utcnow() - timedelta(seconds=100)
    with db.session() as s:
        record_instance(s, _item("1.2.3.4.1"), now=t0)
        record_instance(s, _item("1.2.3.4.2"), now=t0 + timedelta(seconds=1))
    with db.session() as s:
        # Not yet quiet for 200 s: nothing completes.
        assert complete_stable_studies(s, stable_seconds=200, max_seconds=1000) == []
    with db.session() as s:
        done = complete_stable_studies(s, stable_seconds=10, max_seconds=1000)
        assert [d.study_instance_uid for d in done] == ["1.2.3"]
        assert not done[0].forced
    with db.session() as s:
        study = get_study(s, "1.2.3")
        assert study is not None and study.state == StudyState.COMPLETE
        assert s.query(Job).filter_by(study_id=study.id, state=JobState.QUEUED).count() == 1
        # A late instance re-opens the study; completing again adds no second queued job.
        record_instance(s, _item("1.2.3.4.3"), now=utcnow() - timedelta(seconds=50))
        assert s.get(Study, study.id).state == StudyState.RECEIVING  # type: ignore[union-attr]
    with db.session() as s:
        done = complete_stable_studies(s, stable_seconds=10, max_seconds=1000)
        assert len(done) == 1
        study = get_study(s, "1.2.3")
        assert study is not None and study.completion_count == 2
        assert s.query(Job).filter_by(study_id=study.id).count() == 1
        types = [e.event_type for e in audit.events(s)]
        assert types.count(EventType.STUDY_COMPLETED) == 2
        assert EventType.STUDY_REOPENED in types
    db.dispose()


def test_forced_completion_of_a_study_that_never_goes_quiet(db_url: str) -> None:
    db = Database(db_url)
    now = utcnow()
    with db.session() as s:
        record_instance(s, _item("1.2.3.4.1"), now=now - timedelta(seconds=120))
    with db.session() as s:
        # Keep it busy: an instance every second, the latest just now.
        record_instance(s, _item("1.2.3.4.2"), now=now)
    with db.session() as s:
        done = complete_stable_studies(s, stable_seconds=10, max_seconds=60, now=now)
        assert len(done) == 1 and done[0].forced
    db.dispose()


def test_next_stable_due_is_the_earliest_end_of_a_quiet_window(db_url: str) -> None:
    """The completer's precise tick: when the next receiving study falls due."""
    db = Database(db_url)
    with db.session() as s:
        assert next_stable_due(s, stable_seconds=10, max_seconds=1000) is None
    t0 = utcnow() - timedelta(seconds=100)
    with db.session() as s:
        record_instance(s, _item("1.2.3.4.1"), now=t0)
        record_instance(s, _item("1.2.3.4.2"), now=t0 + timedelta(seconds=5))
        record_instance(
            s, _item("1.5.1", study="1.5", series="1.5.0"), now=t0 + timedelta(seconds=7)
        )
    with db.session() as s:
        # Study 1.2.3 last received at t0 + 5 s: due 10 s later; 1.5 two seconds after.
        assert next_stable_due(s, stable_seconds=10, max_seconds=1000) == t0 + timedelta(seconds=15)
        # The time limit counts from the first instance, when it comes first.
        assert next_stable_due(s, stable_seconds=10, max_seconds=3) == t0 + timedelta(seconds=3)
    with db.session() as s:
        complete_stable_studies(
            s, stable_seconds=10, max_seconds=1000, now=t0 + timedelta(seconds=16)
        )
    with db.session() as s:
        # A complete study falls due no more: the other one is next.
        assert next_stable_due(s, stable_seconds=10, max_seconds=1000) == t0 + timedelta(seconds=17)
    db.dispose()
