"""How long each stage took, from the rows the stages already write (for /metrics).

Every duration is a difference of two timestamps the pipeline records
anyway, so the histograms cover all processes and survive restarts:

- receive_to_complete: a study's receiving period to its completion;
- queue_wait: a job queued to claimed;
- analysis: a job claimed to finished;
- report: an analysis run recorded to its SR queued in the outbox;
- delivery: an SR queued to stored at its destination.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    AnalysisRun,
    FindingDecision,
    Job,
    OutboxItem,
    Study,
)

STAGES = ("receive_to_complete", "queue_wait", "analysis", "report", "delivery")


def _seconds(pairs: list[tuple[datetime | None, datetime | None]]) -> list[float]:
    return [max(0.0, (b - a).total_seconds()) for a, b in pairs if a is not None and b is not None]


def stage_durations(session: Session) -> dict[str, list[float]]:
    """Seconds per stage, one value per study, job, run or SR delivery."""
    studies = session.execute(select(Study.receiving_since, Study.completed_at)).all()
    jobs = session.execute(select(Job.created_at, Job.started_at, Job.finished_at)).all()
    sr_queued = (
        select(OutboxItem.run_id, func.min(OutboxItem.created_at).label("queued"))
        .where(OutboxItem.object_kind == "sr")
        .group_by(OutboxItem.run_id)
        .subquery()
    )
    reports = session.execute(
        select(AnalysisRun.created_at, sr_queued.c.queued).join(
            sr_queued, sr_queued.c.run_id == AnalysisRun.id
        )
    ).all()
    deliveries = session.execute(
        select(OutboxItem.created_at, OutboxItem.delivered_at).where(OutboxItem.object_kind == "sr")
    ).all()
    return {
        "receive_to_complete": _seconds([(a, b) for a, b in studies]),
        "queue_wait": _seconds([(a, b) for a, b, _ in jobs]),
        "analysis": _seconds([(b, c) for _, b, c in jobs]),
        "report": _seconds([(a, b) for a, b in reports]),
        "delivery": _seconds([(a, b) for a, b in deliveries]),
    }


def decision_counts(session: Session) -> dict[tuple[str, str, str], int]:
    """Physicians' decisions by (model name, model version, decision)."""
    rows = session.execute(
        select(AnalysisRun.model_name, AnalysisRun.model_version, FindingDecision.decision,
               func.count())
        .join(AnalysisRun, AnalysisRun.id == FindingDecision.run_id)
        .group_by(AnalysisRun.model_name, AnalysisRun.model_version, FindingDecision.decision)
    ).all()  # fmt: skip
    return {(m or "", v or "", d): n for m, v, d, n in rows}
