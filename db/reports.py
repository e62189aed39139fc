"""The report stage's queries: pending runs in, SR/SEG outbox rows out.

A run is read as a plain `PendingRun` (the result contract rebuilt from its
rows, plus the spool paths of its images), so that building DICOM happens
outside any transaction. `record_report` then writes everything the stage
decided in one transaction: the outbox rows, the tracking UIDs and the
run's new state, or none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select, true, update
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    DeliveryState,
    FindingRecord,
    Instance,
    ReportState,
    Series,
    Study,
    Verification,
    utcnow,
)
from db.outbox import NewOutboxItem, queue_items
from db.results import load_run_result
from db.session import changed_rows
from model.results import AnalysisResult, Outcome

ACTOR = "reporter"
# analysis_runs.extras_state: the second pass has the run's other objects to build.
EXTRAS_PENDING = "pending"


@dataclass(frozen=True)
class SourceInstance:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class PendingRun:
    run_id: int
    study_id: int
    created_at: datetime
    result: AnalysisResult  # as the infer stage recorded it, saliency included
    # Spool-relative paths of the images the report refers to: the analysed
    # series, or every image of the study when no series was analysed.
    source_paths: list[str]
    # Finding row ids in the order of `result.findings`.
    finding_ids: list[int]
    # SR of the latest earlier run of this study and model, which a new SR
    # supersedes (Predecessor Documents). None for a first run.
    predecessor_sr_uid: str | None = None
    # What the database knows of each of `source_paths`, in the same order.
    source_instances: list[SourceInstance] = field(default_factory=list)
    # Set once the first pass decided it (the second pass reads it): ReviewSelection.
    review_selection: str | None = None


@dataclass(frozen=True)
class Governed:
    """What governance decided for a run (daemon/stages/report.py `_govern`)."""

    mode: str | None = None  # ModelMode; None: no model (the run says why none ran)
    selection: str | None = None  # ReviewSelection; None: not an analysed result
    sample_fraction: float | None = None  # the fraction of AI negatives drawn then


def pending_run_ids(session: Session, limit: int = 20) -> list[int]:
    """Runs waiting for their report, oldest first (a re-run after its predecessor)."""
    return list(
        session.scalars(
            select(AnalysisRun.id)
            .where(AnalysisRun.report_state == ReportState.PENDING)
            .order_by(AnalysisRun.id)
            .limit(limit)
        )
    )


def extras_run_ids(session: Session, limit: int = 20) -> list[int]:
    """Reported runs whose other objects (map, GSPS, summary) are still to build."""
    return list(
        session.scalars(
            select(AnalysisRun.id)
            .where(AnalysisRun.extras_state == EXTRAS_PENDING)
            .order_by(AnalysisRun.id)
            .limit(limit)
        )
    )


def load_pending_run(
    session: Session,
    run_id: int,
    *,
    state_dir: Path,
    extras: bool = False,
    saliency: bool = True,
) -> PendingRun | None:
    """The run rebuilt as the infer stage's result; None if it is not pending any more.

    `extras`: pending for the second pass (its SR is queued) instead of the first.
    `saliency=False`: without its saliency map (`load_run_result`).
    Raises OSError or ValueError when its saliency file is missing or unreadable.
    """
    run = session.get(AnalysisRun, run_id)
    if run is None:
        return None
    if (
        (run.extras_state != EXTRAS_PENDING)
        if extras
        else (run.report_state != ReportState.PENDING)
    ):
        return None
    # One reading of the rows for both stages: the infer stage's own.
    result = load_run_result(session, run_id, state_dir=state_dir, saliency=saliency)
    finding_ids = list(
        session.scalars(
            select(FindingRecord.id)
            .where(FindingRecord.run_id == run.id)
            .order_by(FindingRecord.id)
        )
    )
    sources_q = (
        select(
            Instance.path,
            Instance.sop_class_uid,
            Instance.sop_instance_uid,
            Series.series_instance_uid,
        )
        .join(Series)
        .where(Series.study_id == run.study_id)
    )
    if run.series_instance_uid and run.outcome == Outcome.ANALYSED:
        sources_q = sources_q.where(Series.series_instance_uid == run.series_instance_uid)
    sources = [
        SourceInstance(*row) for row in session.execute(sources_q.order_by(Instance.id))
    ]
    return PendingRun(
        run_id=run.id,
        study_id=run.study_id,
        created_at=run.created_at,
        result=result,
        source_paths=[s.path for s in sources],
        finding_ids=finding_ids,
        predecessor_sr_uid=_predecessor_sr_uid(session, run),
        source_instances=sources,
        review_selection=run.review_selection,
    )


def _predecessor_sr_uid(session: Session, run: AnalysisRun) -> str | None:
    """The SR of the latest earlier reported run of the same study and model."""
    model = (
        AnalysisRun.model_name.is_(None)
        if run.model_name is None
        else AnalysisRun.model_name == run.model_name
    )
    return session.execute(
        select(AnalysisRun.sr_sop_instance_uid)
        .where(
            AnalysisRun.study_id == run.study_id,
            AnalysisRun.id < run.id,
            AnalysisRun.report_state == ReportState.REPORTED,
            AnalysisRun.sr_sop_instance_uid.is_not(None),
            model,
            # Champion and challenger (two versions of one model) run in the
            # same job, side by side: neither supersedes the other.
            or_(AnalysisRun.job_id.is_(None), AnalysisRun.job_id != run.job_id)
            if run.job_id is not None
            else true(),
        )
        .order_by(AnalysisRun.id.desc())
        .limit(1)
    ).scalar()


def record_report(
    session: Session,
    run: PendingRun,
    *,
    sr_sop_instance_uid: str,
    tracking_uids: dict[int, str],
    objects: Sequence[NewOutboxItem],
    extras_pending: bool = False,
    governance: Governed | None = None,
    now: datetime | None = None,
) -> bool:
    """Mark the run reported and queue its SR (and SEG); False if another pass did it first.

    `extras_pending`: its other objects are built by the second pass (`record_extras`).
    `governance`: the model version's mode and the run's place in the worklist.
    """
    rules = governance or Governed()
    now = now or utcnow()
    changed = changed_rows(
        session,
        update(AnalysisRun)
        .where(AnalysisRun.id == run.run_id, AnalysisRun.report_state == ReportState.PENDING)
        .values(
            report_state=ReportState.REPORTED,
            report_error=None,
            sr_sop_instance_uid=sr_sop_instance_uid,
            extras_state=EXTRAS_PENDING if extras_pending else None,
            mode=rules.mode,
            review_selection=rules.selection,
            sample_fraction=rules.sample_fraction,
        )
    )
    if not changed:
        return False
    for finding_id, uid in tracking_uids.items():
        session.execute(
            update(FindingRecord).where(FindingRecord.id == finding_id).values(tracking_uid=uid)
        )
    queued = _queue(session, run, objects, now)
    audit.record(
        session,
        EventType.REPORT_CREATED,
        ACTOR,
        study_instance_uid=run.result.study_instance_uid,
        sop_instance_uid=sr_sop_instance_uid,
        run_id=run.run_id,
        outcome=str(run.result.outcome),
        objects=sorted({o.sop_instance_uid for o in objects}),
        outbox_items=queued,
        predecessor=run.predecessor_sr_uid,
        mode=rules.mode,
        review_selection=rules.selection,
    )
    return True


def record_withheld(session: Session, run: PendingRun, governance: Governed) -> bool:
    """A silent model version's run: recorded, nothing built or sent; False if done already."""
    changed = changed_rows(
        session,
        update(AnalysisRun)
        .where(AnalysisRun.id == run.run_id, AnalysisRun.report_state == ReportState.PENDING)
        .values(
            report_state=ReportState.WITHHELD,
            mode=governance.mode,
            review_selection=None,
            sample_fraction=None,
        )
    )
    if changed:
        audit.record(
            session,
            EventType.REPORT_WITHHELD,
            ACTOR,
            study_instance_uid=run.result.study_instance_uid,
            run_id=run.run_id,
            mode=governance.mode,
        )
    return bool(changed)


def record_extras(
    session: Session, run: PendingRun, objects: Sequence[NewOutboxItem], now: datetime | None = None
) -> bool:
    """Queue the run's other objects and mark them built; False if done already."""
    now = now or utcnow()
    changed = changed_rows(
        session,
        update(AnalysisRun)
        .where(AnalysisRun.id == run.run_id, AnalysisRun.extras_state == EXTRAS_PENDING)
        .values(extras_state=None)
    )
    if not changed:
        return False
    queued = _queue(session, run, objects, now)
    audit.record(
        session,
        EventType.REPORT_EXTRAS_CREATED,
        ACTOR,
        study_instance_uid=run.result.study_instance_uid,
        run_id=run.run_id,
        kinds=sorted({o.object_kind for o in objects}),
        objects=sorted({o.sop_instance_uid for o in objects}),
        outbox_items=queued,
    )
    return True


def record_extras_skipped(session: Session, run_id: int) -> None:
    """The second pass cannot build the run's other objects (its files are gone): none."""
    session.execute(
        update(AnalysisRun)
        .where(AnalysisRun.id == run_id, AnalysisRun.extras_state == EXTRAS_PENDING)
        .values(extras_state=None)
    )


def is_verified(session: Session, run_id: int) -> bool:
    """A physician's verified SR exists for the run (its review is decided)."""
    return session.scalar(select(Verification.id).where(Verification.run_id == run_id)) is not None


def _queue(
    session: Session, run: PendingRun, objects: Sequence[NewOutboxItem], now: datetime
) -> int:
    queued = queue_items(session, objects, now=now)
    for item in objects:
        if item.state == DeliveryState.HELD:
            audit.record(
                session,
                EventType.RELEASE_HELD,
                ACTOR,
                study_instance_uid=run.result.study_instance_uid,
                sop_instance_uid=item.sop_instance_uid,
                run_id=run.run_id,
                destination=item.destination,
            )
    return queued


def record_report_failure(
    session: Session, run_id: int, study_instance_uid: str | None, error: str
) -> None:
    """The run's report cannot be built (its images are gone, its rows are invalid)."""
    changed = changed_rows(
        session,
        update(AnalysisRun)
        .where(AnalysisRun.id == run_id, AnalysisRun.report_state == ReportState.PENDING)
        .values(report_state=ReportState.FAILED, report_error=error)
    )
    if changed:
        audit.record(
            session,
            EventType.REPORT_FAILED,
            ACTOR,
            study_instance_uid=study_instance_uid,
            run_id=run_id,
            error=error,
        )


def requeue_failed_reports(
    session: Session, *, run_ids: Sequence[int] = (), actor: str
) -> list[int]:
    """Failed reports back to pending (all, or `run_ids`); returns the run ids.

    After a fix (a new version, a repaired spool file) the report stage
    builds them again; each is audited.
    """
    stmt = select(AnalysisRun.id, AnalysisRun.study_id).where(
        AnalysisRun.report_state == ReportState.FAILED
    )
    if run_ids:
        stmt = stmt.where(AnalysisRun.id.in_(list(run_ids)))
    rows = session.execute(stmt.order_by(AnalysisRun.id)).all()
    for run_id, study_id in rows:
        session.execute(
            update(AnalysisRun)
            .where(AnalysisRun.id == run_id, AnalysisRun.report_state == ReportState.FAILED)
            .values(report_state=ReportState.PENDING, report_error=None)
        )
        audit.record(
            session,
            EventType.REPORT_REQUEUED,
            actor,
            study_instance_uid=session.execute(
                select(Study.study_instance_uid).where(Study.id == study_id)
            ).scalar_one(),
            run_id=run_id,
        )
    return [r[0] for r in rows]


def report_counts(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(AnalysisRun.report_state, func.count()).group_by(AnalysisRun.report_state)
    ).all()
    return {state: n for state, n in rows}
