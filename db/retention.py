"""Retention queries: which studies are finished, their files, and marking them removed.

A study is finished when nothing of the pipeline can still need its files:

- it is complete (not receiving) and its files are not removed yet;
- no job of it is queued or running, and it has at least one analysis run;
- every run is reported, its objects beside the SR too (a failed report
  still needs the images);
- every outbox item is done or withheld (pending, held, dead: not yet);
- with `wait_for_review`, every analysed run has a verified SR.

Its finish time is the latest of completion, run, delivery and verification.
The SRs in the outbox (the AI SR and the verified SRs) are never removed:
they are small, and an amendment builds on them (daemon/stages/review.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    AncillaryInstance,
    DeliveryState,
    Instance,
    Job,
    JobState,
    OutboxItem,
    ReportState,
    Series,
    Study,
    StudyState,
    Verification,
    utcnow,
)
from db.reviews import drawn_for_review
from db.session import changed_rows
from model.results import Outcome

# Outbox objects kept for good: the reviewer's amendments read them.
KEPT_OUTBOX_KINDS = ("sr", "verified-sr")


@dataclass(frozen=True)
class FinishedStudy:
    study_id: int
    study_instance_uid: str
    finished_at: datetime
    last_received_at: datetime  # what the removal is conditional on


@dataclass(frozen=True)
class StudyFiles:
    """Paths of one study's removable files, each relative to its folder."""

    spool: list[str]  # under the spool folder
    state: list[str]  # under the state folder (saliency maps, outbox objects)
    ancillary: list[str]  # under the ancillary folder


def finished_studies(
    session: Session,
    *,
    completed_before: datetime | None = None,
    wait_for_review: bool = False,
    limit: int = 100,
) -> list[FinishedStudy]:
    """Finished studies whose files are still there, the earliest finished first.

    `completed_before` narrows the scan (a study finishes after it completes).
    """
    busy_job = exists().where(
        Job.study_id == Study.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING))
    )
    any_run = exists().where(AnalysisRun.study_id == Study.id)
    unreported = exists().where(
        AnalysisRun.study_id == Study.id,
        # A silent model version's run is done once withheld: nothing will be built.
        AnalysisRun.report_state.not_in((ReportState.REPORTED, ReportState.WITHHELD))
        | AnalysisRun.extras_state.is_not(None),
    )
    undelivered = exists().where(
        OutboxItem.study_id == Study.id,
        OutboxItem.state.not_in((DeliveryState.DONE, DeliveryState.WITHHELD)),
    )
    query = select(Study).where(
        Study.state == StudyState.COMPLETE,
        Study.files_removed_at.is_(None),
        ~busy_job,
        any_run,
        ~unreported,
        ~undelivered,
    )
    if wait_for_review:
        unreviewed = exists().where(
            AnalysisRun.study_id == Study.id,
            AnalysisRun.outcome == Outcome.ANALYSED,
            # Only what the worklist shows waits for a reader: not a silent
            # version's run, not an AI negative left out of the sample.
            AnalysisRun.report_state == ReportState.REPORTED,
            drawn_for_review(),
            ~exists().where(Verification.run_id == AnalysisRun.id),
        )
        query = query.where(~unreviewed)
    if completed_before is not None:
        query = query.where(Study.completed_at < completed_before)
    # Scan in completion order; the finish time is computed per study below.
    studies = session.scalars(query.order_by(Study.completed_at, Study.id).limit(limit)).all()
    out = [
        FinishedStudy(s.id, s.study_instance_uid, _finished_at(session, s), s.last_received_at)
        for s in studies
    ]
    return sorted(out, key=lambda f: (f.finished_at, f.study_id))


def _finished_at(session: Session, study: Study) -> datetime:
    times = [
        study.completed_at,
        session.scalar(select(func.max(AnalysisRun.created_at)).where(
            AnalysisRun.study_id == study.id
        )),
        session.scalar(select(func.max(OutboxItem.delivered_at)).where(
            OutboxItem.study_id == study.id
        )),
        session.scalar(
            select(func.max(Verification.created_at))
            .join(AnalysisRun, AnalysisRun.id == Verification.run_id)
            .where(AnalysisRun.study_id == study.id)
        ),
    ]  # fmt: skip
    return max(t for t in times if t is not None)


def study_files(session: Session, study_id: int, up_to: datetime | None = None) -> StudyFiles:
    """The study's removable files as the database records them.

    `up_to`: only what was received or made by then (a study whose removal
    was recorded: what came later, after it re-opened, stays).
    """
    study = session.get(Study, study_id)
    assert study is not None
    spool_q = select(Instance.path).join(Series).where(Series.study_id == study_id)
    saliency_q = select(AnalysisRun.saliency_path).where(
        AnalysisRun.study_id == study_id, AnalysisRun.saliency_path.is_not(None)
    )
    outbox_q = select(OutboxItem.path).where(
        OutboxItem.study_id == study_id, OutboxItem.object_kind.not_in(KEPT_OUTBOX_KINDS)
    )
    ancillary_q = select(AncillaryInstance.path).where(
        AncillaryInstance.study_instance_uid == study.study_instance_uid,
        AncillaryInstance.path.is_not(None),
    )
    if up_to is not None:
        spool_q = spool_q.where(Instance.received_at <= up_to)
        saliency_q = saliency_q.where(AnalysisRun.created_at <= up_to)
        outbox_q = outbox_q.where(OutboxItem.created_at <= up_to)
        ancillary_q = ancillary_q.where(AncillaryInstance.received_at <= up_to)
    state = [*session.scalars(saliency_q), *session.scalars(outbox_q.distinct())]
    return StudyFiles(
        spool=list(session.scalars(spool_q)),
        state=[p for p in state if p],
        ancillary=[p for p in session.scalars(ancillary_q) if p],
    )


def removed_studies(session: Session, since: datetime) -> list[tuple[int, datetime]]:
    """(study id, removal time) of the studies whose files were removed since `since`."""
    rows = session.execute(
        select(Study.id, Study.files_removed_at).where(Study.files_removed_at >= since)
    ).all()
    return [(study_id, at) for study_id, at in rows if at is not None]


def mark_files_removed(session: Session, study: FinishedStudy, now: datetime | None = None) -> bool:
    """Record that the study's files go, if nothing arrived since it was found finished.

    Conditional on the study being complete, not removed, and its last
    instance the one seen when it was chosen: a late instance (which re-opens
    the study) makes this return False, and nothing is removed.
    """
    changed = changed_rows(
        session,
        update(Study)
        .where(
            Study.id == study.study_id,
            Study.state == StudyState.COMPLETE,
            Study.files_removed_at.is_(None),
            Study.last_received_at == study.last_received_at,
        )
        .values(files_removed_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(changed)


def record_removal(
    session: Session, study: FinishedStudy, *, files: int, size_bytes: int, reason: str
) -> None:
    audit.record(
        session,
        EventType.STUDY_FILES_REMOVED,
        "retention",
        study_instance_uid=study.study_instance_uid,
        files=files,
        size_bytes=size_bytes,
        reason=reason,
    )


def files_removed_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).where(Study.files_removed_at.is_not(None))) or 0)
