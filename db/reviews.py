"""The physician review's queries: results to review, decisions, verifications, statistics.

A "result" is an analysed AnalysisRun whose report was built (its AI SR
exists): each of its findings gets a decision, round by round. Round 1 is
the first review; an amendment is the next round. The service layer
(daemon/stages/review.py) decides what is allowed; this module reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    AuditEvent,
    Decision,
    DeliveryState,
    FindingDecision,
    FindingRecord,
    Instance,
    OutboxItem,
    ReportState,
    ReviewSelection,
    Series,
    Study,
    Verification,
    utcnow,
)
from dicom_io.wording import SIDES
from model.results import Outcome


@dataclass(frozen=True)
class FindingView:
    number: int  # 1-based, in the run's order: what a reviewer types
    finding_id: int
    label: str
    finding: str  # code meaning, e.g. "Nodule"
    site: str
    probability: float
    threshold: float
    present: bool
    tracking_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    frame_number: int | None
    point: dict[str, float] | None
    box: dict[str, float] | None


@dataclass(frozen=True)
class DecisionView:
    finding_id: int
    round: int
    decision: str
    reviewer: str
    organization: str
    comment: str | None
    location: dict[str, Any] | None
    decided_at: datetime


@dataclass(frozen=True)
class VerificationView:
    round: int
    reviewer: str
    organization: str
    reason: str | None
    sr_sop_instance_uid: str
    predecessor_sop_instance_uid: str
    created_at: datetime


@dataclass
class ResultView:
    run_id: int
    study_id: int
    study_instance_uid: str
    series_instance_uid: str | None
    modality: str | None
    model_name: str | None
    model_version: str | None
    model_device_uid: str | None
    created_at: datetime
    ai_sr_sop_instance_uid: str | None
    findings: list[FindingView] = field(default_factory=list)
    decisions: list[DecisionView] = field(default_factory=list)
    verifications: list[VerificationView] = field(default_factory=list)
    # Governance (db/models.py ModelMode, ReviewSelection); None before it.
    mode: str | None = None
    review_selection: str | None = None

    @property
    def sampled_negative(self) -> bool:
        """An AI-negative result drawn for quality control: the reader says what is there."""
        return self.review_selection == ReviewSelection.SAMPLED_NEGATIVE

    @property
    def top_probability(self) -> float:
        return max((f.probability for f in self.findings), default=0.0)

    @property
    def state(self) -> str:
        if self.verifications:
            return "amended" if len(self.verifications) > 1 else "verified"
        return "in_review" if self.decisions else "pending"

    @property
    def round(self) -> int:
        """The round decisions go into now: the first one not verified yet."""
        return len(self.verifications) + 1


def _reviewable(stmt: Any) -> Any:
    return stmt.where(
        AnalysisRun.outcome == Outcome.ANALYSED,
        AnalysisRun.report_state == ReportState.REPORTED,
        AnalysisRun.sr_sop_instance_uid.is_not(None),
    )


def drawn_for_review() -> Any:
    """A run the worklist lists: not an AI negative left out of the quality-control sample
    (monitoring.negative_sample_fraction); runs from before governance have no selection."""
    return or_(
        AnalysisRun.review_selection.is_(None),
        AnalysisRun.review_selection != ReviewSelection.UNSAMPLED_NEGATIVE,
    )


def load_result(session: Session, run_id: int) -> ResultView | None:
    row = session.execute(
        _reviewable(
            select(AnalysisRun, Study.study_instance_uid)
            .join(Study, Study.id == AnalysisRun.study_id)
            .where(AnalysisRun.id == run_id)
        )
    ).first()
    if row is None:
        return None
    return _view(session, row[0], row[1])


def _site(f: FindingRecord) -> str:
    """"Lung"; a projection finding with its side and views: "Breast, right (R CC, R MLO)"."""
    site = str(f.site_code.get("meaning", ""))
    if f.laterality:
        site += f", {SIDES.get(f.laterality, f.laterality)}"
    if f.lesion is not None:  # a detector's or a segmentation's: which lesion, how large
        site += f", lesion {f.lesion}" + (f", {f.diameter_mm:.0f} mm" if f.diameter_mm else "")
    if f.volume_ml is not None:
        site += f", {f.volume_ml:.2f} mL"
    views = f.views or ([f.view] if f.view else [])
    return f"{site} ({', '.join(views)})" if views else site


def _view(session: Session, run: AnalysisRun, study_uid: str) -> ResultView:
    modality = None
    if run.series_instance_uid:
        modality = session.execute(
            select(Series.modality).where(Series.series_instance_uid == run.series_instance_uid)
        ).scalar()
    findings = [
        FindingView(
            number=i,
            finding_id=f.id,
            label=f.label,
            finding=str(f.finding_code.get("meaning", f.label)),
            site=_site(f),
            probability=float(f.probability),
            threshold=float(f.threshold),
            present=bool(f.present),
            tracking_uid=f.tracking_uid,
            sop_instance_uid=f.sop_instance_uid,
            sop_class_uid=f.sop_class_uid,
            frame_number=f.frame_number,
            point=f.point,
            box=f.box,
        )
        for i, f in enumerate(
            session.scalars(
                select(FindingRecord)
                .where(FindingRecord.run_id == run.id)
                .order_by(FindingRecord.id)
            ),
            start=1,
        )
    ]
    decisions = [
        DecisionView(
            d.finding_id,
            d.round,
            d.decision,
            d.reviewer,
            d.organization,
            d.comment,
            d.location,
            d.decided_at,
        )
        for d in session.scalars(
            select(FindingDecision)
            .where(FindingDecision.run_id == run.id)
            .order_by(FindingDecision.round, FindingDecision.id)
        )
    ]
    verifications = [
        VerificationView(
            v.round,
            v.reviewer,
            v.organization,
            v.reason,
            v.sr_sop_instance_uid,
            v.predecessor_sop_instance_uid,
            v.created_at,
        )
        for v in session.scalars(
            select(Verification).where(Verification.run_id == run.id).order_by(Verification.round)
        )
    ]
    return ResultView(
        run_id=run.id,
        study_id=run.study_id,
        study_instance_uid=study_uid,
        series_instance_uid=run.series_instance_uid,
        modality=modality,
        model_name=run.model_name,
        model_version=run.model_version,
        model_device_uid=run.model_device_uid,
        created_at=run.created_at,
        ai_sr_sop_instance_uid=run.sr_sop_instance_uid,
        findings=findings,
        decisions=decisions,
        verifications=verifications,
        mode=run.mode,
        review_selection=run.review_selection,
    )


def list_results(
    session: Session,
    *,
    state: str | None = "pending",
    modality: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    limit: int = 200,
) -> list[ResultView]:
    """Results by state ("pending", "in_review", "verified", "amended"; None: all)."""
    stmt = _reviewable(
        select(AnalysisRun, Study.study_instance_uid).join(Study, Study.id == AnalysisRun.study_id)
    )
    stmt = stmt.where(drawn_for_review())
    if model is not None:
        stmt = stmt.where(AnalysisRun.model_name == model)
    if since is not None:
        stmt = stmt.where(AnalysisRun.created_at >= since)
    views = [_view(session, run, uid) for run, uid in session.execute(stmt)]
    if state is not None:
        wanted = {"pending": ("pending", "in_review"), "decided": ("verified", "amended")}.get(
            state, (state,)
        )
        views = [v for v in views if v.state in wanted]
    if modality is not None:
        views = [v for v in views if (v.modality or "").upper() == modality.upper()]
    return views[:limit]


def record_decision(
    session: Session,
    result: ResultView,
    finding: FindingView,
    *,
    round: int,
    decision: str,
    reviewer: str,
    organization: str,
    comment: str | None,
    location: dict[str, Any] | None,
    amendment: bool = False,
    now: datetime | None = None,
) -> None:
    if decision not in tuple(Decision):
        raise ValueError(f"unknown decision {decision!r}")
    now = now or utcnow()
    session.add(
        FindingDecision(
            run_id=result.run_id,
            finding_id=finding.finding_id,
            round=round,
            decision=decision,
            reviewer=reviewer,
            organization=organization,
            comment=comment,
            location=location,
            decided_at=now,
        )
    )
    session.flush()  # the unique (finding, round) constraint speaks now, not at commit
    audit.record(
        session,
        EventType.REVIEW_AMENDED if amendment else EventType.REVIEW_DECIDED,
        reviewer,
        study_instance_uid=result.study_instance_uid,
        run_id=result.run_id,
        finding=finding.number,
        tracking_uid=finding.tracking_uid,
        round=round,
        decision=decision,
        organization=organization,
        # Free text may name the patient: the comment stays in its row and in
        # the verified SR, never in the trail (UIDs only there).
        has_comment=bool(comment),
        location=location,
    )


def lock_run(session: Session, run_id: int) -> None:
    """Hold the run's row until the transaction ends.

    Signing, finalising and undoing one result take this lock first, so an
    undo and the verified SR it races with are ordered. A no-op UPDATE, not
    SELECT ... FOR UPDATE: on PostgreSQL it locks the row, and on SQLite
    (where FOR UPDATE means nothing) it starts the write transaction before
    the reads that follow, so they see what the other writer committed.
    """
    session.execute(
        update(AnalysisRun).where(AnalysisRun.id == run_id)
        .values(report_state=AnalysisRun.report_state)
        .execution_options(synchronize_session=False)
    )  # fmt: skip


def withdraw_decisions(
    session: Session, result: ResultView, *, reviewer: str, since: datetime
) -> list[int]:
    """The current round's decisions by `reviewer` made at or after `since`, removed.

    Only an unverified round's: its verified SR was never built. The audit
    trail keeps both the decision and its withdrawal. Returns the finding numbers.
    """
    mine = [
        d
        for d in result.decisions
        if d.round == result.round and d.reviewer == reviewer and d.decided_at >= since
    ]
    if not mine:
        return []
    session.execute(
        delete(FindingDecision).where(
            FindingDecision.run_id == result.run_id,
            FindingDecision.round == result.round,
            FindingDecision.finding_id.in_([d.finding_id for d in mine]),
        )
    )
    numbers = [f.number for f in result.findings if f.finding_id in {d.finding_id for d in mine}]
    audit.record(
        session,
        EventType.REVIEW_UNDONE,
        reviewer,
        study_instance_uid=result.study_instance_uid,
        run_id=result.run_id,
        round=result.round,
        findings=numbers,
    )
    return numbers


def record_verification(
    session: Session,
    result: ResultView,
    *,
    round: int,
    reviewer: str,
    organization: str,
    reason: str | None,
    sr_sop_instance_uid: str,
    predecessor: str,
    now: datetime | None = None,
) -> None:
    now = now or utcnow()
    session.add(
        Verification(
            run_id=result.run_id,
            round=round,
            reviewer=reviewer,
            organization=organization,
            reason=reason,
            sr_sop_instance_uid=sr_sop_instance_uid,
            predecessor_sop_instance_uid=predecessor,
            created_at=now,
        )
    )
    session.flush()
    audit.record(
        session,
        EventType.VERIFIED_SR_CREATED,
        reviewer,
        study_instance_uid=result.study_instance_uid,
        sop_instance_uid=sr_sop_instance_uid,
        run_id=result.run_id,
        round=round,
        predecessor=predecessor,
        reason=reason,
    )


def release_held(
    session: Session, result: ResultView, *, send: dict[str, bool], actor: str
) -> dict[str, int]:
    """The run's held AI objects: released (`send[destination]`) or withheld for good."""
    held = session.scalars(
        select(OutboxItem).where(
            OutboxItem.run_id == result.run_id, OutboxItem.state == DeliveryState.HELD
        )
    ).all()
    counts = {"released": 0, "withheld": 0}
    now = utcnow()
    for item in held:
        released = send.get(item.destination, False)
        session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == item.id, OutboxItem.state == DeliveryState.HELD)
            .values(
                state=DeliveryState.PENDING if released else DeliveryState.WITHHELD,
                next_attempt_at=now,
                created_at=now,  # the dead-letter window starts at the release
            )
        )
        counts["released" if released else "withheld"] += 1
        audit.record(
            session,
            EventType.RELEASE_RELEASED if released else EventType.RELEASE_WITHHELD,
            actor,
            study_instance_uid=result.study_instance_uid,
            sop_instance_uid=item.sop_instance_uid,
            run_id=result.run_id,
            destination=item.destination,
        )
    return counts


def history(session: Session, result: ResultView) -> list[AuditEvent]:
    """The run's audit events in order: analysis, report, deliveries, reviews."""
    return [
        e
        for e in audit.study_story(session, study_instance_uid=result.study_instance_uid)
        if e.detail.get("run_id") in (None, result.run_id)
    ]


# -- agreement statistics --------------------------------------------------------


@dataclass
class Agreement:
    """Decisions on one model version's findings (the latest round of each finding).

    Split by what the AI said, so that the table's columns add up to its
    figures: PPV = (present confirmed + present corrected) / present decided.
    """

    model: str
    period: str  # ISO week "2026-W49", or "overall"
    present_confirmed: int = 0
    present_corrected: int = 0  # there, at another location: upheld
    present_rejected: int = 0
    absent_confirmed: int = 0  # the physician agrees nothing is there
    absent_rejected: int = 0  # the physician says it is there
    absent_corrected: int = 0

    @property
    def confirmed(self) -> int:
        return self.present_confirmed + self.absent_confirmed

    @property
    def rejected(self) -> int:
        return self.present_rejected + self.absent_rejected

    @property
    def corrected(self) -> int:
        return self.present_corrected + self.absent_corrected

    @property
    def present_decided(self) -> int:
        """Findings the AI called present, decided."""
        return self.present_confirmed + self.present_corrected + self.present_rejected

    @property
    def present_upheld(self) -> int:
        """... confirmed or corrected: the physician agrees it is there."""
        return self.present_confirmed + self.present_corrected

    @property
    def decided(self) -> int:
        return self.confirmed + self.rejected + self.corrected

    @property
    def ppv(self) -> float | None:
        """Of the findings the AI called present, the share the physician upheld."""
        return self.present_upheld / self.present_decided if self.present_decided else None

    @property
    def agreement(self) -> float | None:
        """Share of decisions that confirmed the AI as it stood (location included)."""
        return self.confirmed / self.decided if self.decided else None

    def as_dict(self) -> dict[str, Any]:
        names = ("confirmed", "rejected", "corrected", "present_decided", "present_upheld",
                 "decided", "ppv", "agreement")  # fmt: skip
        return {**vars(self), **{n: getattr(self, n) for n in names}}


_PAST: dict[str, str] = {Decision.CONFIRM: "confirmed", Decision.REJECT: "rejected",
         Decision.CORRECT: "corrected"}  # fmt: skip


def latest_decision() -> tuple[Any, Any]:
    """A FindingDecision alias and the ON clause that joins each finding to its latest round's
    decision (outer-join it: an undecided finding gets None)."""
    decision, other = aliased(FindingDecision), aliased(FindingDecision)
    newest = select(func.max(other.round)).where(other.finding_id == FindingRecord.id)
    on = and_(decision.finding_id == FindingRecord.id, decision.round == newest.scalar_subquery())
    return decision, on


def agreement_stats(session: Session, *, model: str | None = None) -> list[Agreement]:
    """Per model name and version: by ISO week of the decision, then overall."""
    latest = (
        select(FindingDecision.finding_id, func.max(FindingDecision.round).label("round"))
        .group_by(FindingDecision.finding_id)
        .subquery()
    )
    stmt = (
        select(
            FindingDecision.decision,
            FindingDecision.decided_at,
            FindingRecord.present,
            AnalysisRun.model_name,
            AnalysisRun.model_version,
        )
        .join(
            latest,
            (latest.c.finding_id == FindingDecision.finding_id)
            & (latest.c.round == FindingDecision.round),
        )
        .join(FindingRecord, FindingRecord.id == FindingDecision.finding_id)
        .join(AnalysisRun, AnalysisRun.id == FindingDecision.run_id)
    )
    if model is not None:
        stmt = stmt.where(AnalysisRun.model_name == model)
    table: dict[tuple[str, str], Agreement] = {}
    for decision, decided_at, present, name, version in session.execute(stmt):
        label = f"{name} {version}"
        year, week, _ = decided_at.isocalendar()
        for period in (f"{year}-W{week:02d}", "overall"):
            row = table.setdefault((label, period), Agreement(label, period))
            field = f"{'present' if present else 'absent'}_{_PAST[decision]}"
            setattr(row, field, getattr(row, field) + 1)
    # Weeks in order, "overall" last, per model.
    return sorted(table.values(), key=lambda a: (a.model, a.period == "overall", a.period))


def series_images(session: Session, run_id: int) -> tuple[list[tuple[str, str]], str | None]:
    """The analysed series' images as (SOP Instance UID, spool path), and the saliency file."""
    run = session.get(AnalysisRun, run_id)
    if run is None or run.series_instance_uid is None:
        return [], None
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.series_instance_uid == run.series_instance_uid)
        .order_by(Instance.id)
    ).all()
    return [(uid, path) for uid, path in rows], run.saliency_path


def run_provenance(session: Session, run_id: int) -> dict[str, Any]:
    """How the run came about: the algorithm's parameters (weights hash, threshold), the
    preprocessing steps with their parameters and times, and the job and worker."""
    run = session.get(AnalysisRun, run_id)
    return dict(run.provenance) if run is not None and run.provenance else {}
