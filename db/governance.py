"""Model governance's queries: each model version's mode, and what its results earned.

A version's mode is its latest `model_mode_changes` row, else the site's
default (`monitoring.default_mode`). Only `set_mode` writes that table, and
every change is audited with who made it, why and the evidence shown.

The review figures come back as plain `ReviewedFinding` rows (one per
finding of a governed run, with its latest decision and the subgroups of
its run's observation); daemon/stages/monitor/performance.py turns them
into PPV, sensitivity and their intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    FindingRecord,
    Job,
    ModelMode,
    ModelModeChange,
    RunObservation,
    utcnow,
)
from db.reviews import latest_decision
from model.results import Outcome

MODES = tuple(m.value for m in ModelMode)


@dataclass(frozen=True)
class ModeChange:
    model_name: str
    model_version: str
    mode: str
    changed_at: datetime
    changed_by: str
    reason: str
    evidence: dict[str, Any]


@dataclass(frozen=True)
class VersionSummary:
    """A model version as the monitoring page lists it."""

    model_name: str
    model_version: str
    mode: str  # now
    mode_set: bool  # False: the site's default, nobody has set it
    runs: int  # analysed runs
    withheld: int  # of which silent (never shown or sent)
    first_run: datetime | None
    last_run: datetime | None


@dataclass(frozen=True)
class ReviewedFinding:
    """One finding of a governed, analysed run, as the performance figures need it."""

    run_id: int
    label: str
    present: bool  # the AI's call
    selection: str | None  # analysis_runs.review_selection (None: before governance)
    decision: str | None  # the latest round's decision, None if undecided
    decided_at: datetime | None
    analysed_at: datetime
    # Subgroups, from the run's observation (None where unknown).
    patient_sex: str | None
    age_band: str | None
    manufacturer: str | None
    calling_ae: str | None


def current_mode(session: Session, model_name: str, model_version: str, default: str) -> str:
    mode = session.scalar(
        select(ModelModeChange.mode)
        .where(
            ModelModeChange.model_name == model_name,
            ModelModeChange.model_version == model_version,
        )
        .order_by(ModelModeChange.id.desc())
        .limit(1)
    )
    return mode or default


def set_mode(
    session: Session,
    model_name: str,
    model_version: str,
    mode: str,
    *,
    changed_by: str,
    reason: str,
    evidence: dict[str, Any],
    previous: str,
    now: datetime | None = None,
) -> ModeChange:
    """Record the version's new mode (from its next result on) and audit it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    now = now or utcnow()
    session.add(
        ModelModeChange(
            model_name=model_name,
            model_version=model_version,
            mode=mode,
            changed_at=now,
            changed_by=changed_by,
            reason=reason,
            evidence=evidence,
        )
    )
    audit.record(
        session,
        EventType.MODEL_MODE_CHANGED,
        changed_by,
        model=f"{model_name} {model_version}",
        previous=previous,
        mode=mode,
        reason=reason,
        evidence=evidence,
    )
    return ModeChange(model_name, model_version, mode, now, changed_by, reason, evidence)


def mode_history(session: Session, model_name: str, model_version: str) -> list[ModeChange]:
    rows = session.scalars(
        select(ModelModeChange)
        .where(
            ModelModeChange.model_name == model_name,
            ModelModeChange.model_version == model_version,
        )
        .order_by(ModelModeChange.id)
    )
    return [
        ModeChange(r.model_name, r.model_version, r.mode, r.changed_at, r.changed_by, r.reason,
                   dict(r.evidence or {}))
        for r in rows
    ]  # fmt: skip


def versions(
    session: Session, default: str, configured: Sequence[tuple[str, str]] = ()
) -> list[VersionSummary]:
    """Every model version that analysed a study, whose mode was set, or that is `configured`
    (name, version) and has not run yet, by name and version."""
    rows = session.execute(
        select(
            AnalysisRun.model_name,
            AnalysisRun.model_version,
            func.count(),
            func.sum(case((AnalysisRun.mode == ModelMode.SILENT, 1), else_=0)),
            func.min(AnalysisRun.created_at),
            func.max(AnalysisRun.created_at),
        )
        .where(AnalysisRun.outcome == Outcome.ANALYSED, AnalysisRun.model_name.is_not(None))
        .group_by(AnalysisRun.model_name, AnalysisRun.model_version)
    ).all()
    seen: dict[tuple[str, str], tuple[int, int, datetime | None, datetime | None]] = {
        (name, version): (int(n), int(silent or 0), first, last)
        for name, version, n, silent, first, last in rows
    }
    latest = latest_modes(session)
    for key in [*latest, *configured]:
        seen.setdefault(key, (0, 0, None, None))
    return [
        VersionSummary(name, version, latest.get((name, version), default),
                       (name, version) in latest, n, silent, first, last)
        for (name, version), (n, silent, first, last) in sorted(seen.items())
    ]  # fmt: skip


def latest_modes(session: Session) -> dict[tuple[str, str], str]:
    """(name, version) -> the mode an admin set last, for every version that has one."""
    latest: dict[tuple[str, str], str] = {}
    for name, version, mode in session.execute(
        select(ModelModeChange.model_name, ModelModeChange.model_version, ModelModeChange.mode)
        .order_by(ModelModeChange.id)
    ):
        latest[(name, version)] = mode  # a later change overwrites an earlier one
    return latest


def reviewed_findings(
    session: Session,
    model_name: str,
    model_version: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[ReviewedFinding]:
    """The version's findings on results that reached the worklist or could have (not silent)."""
    decision, on_latest = latest_decision()
    stmt = (
        select(
            AnalysisRun.id,
            FindingRecord.label,
            FindingRecord.present,
            AnalysisRun.review_selection,
            decision.decision,
            decision.decided_at,
            AnalysisRun.created_at,
            RunObservation.patient_sex,
            RunObservation.age_band,
            RunObservation.manufacturer,
            RunObservation.calling_ae,
        )
        .join(AnalysisRun, AnalysisRun.id == FindingRecord.run_id)
        .outerjoin(decision, on_latest)
        .outerjoin(RunObservation, RunObservation.run_id == AnalysisRun.id)
        .where(
            AnalysisRun.model_name == model_name,
            AnalysisRun.model_version == model_version,
            AnalysisRun.outcome == Outcome.ANALYSED,
            func.coalesce(AnalysisRun.mode, ModelMode.LIVE) != ModelMode.SILENT,
        )
        .order_by(AnalysisRun.id, FindingRecord.id)
    )
    if since is not None:
        stmt = stmt.where(AnalysisRun.created_at >= since)
    if until is not None:
        stmt = stmt.where(AnalysisRun.created_at < until)
    return [ReviewedFinding(*row) for row in session.execute(stmt)]


@dataclass(frozen=True)
class PairedCall:
    """Two versions of one model on the same study (the same job): champion and challenger."""

    label: str
    first: bool  # the first version's call: present
    second: bool


def paired_calls(
    session: Session, model_name: str, first_version: str, second_version: str
) -> list[PairedCall]:
    """Each study both versions analysed (the same job), per label and side: both calls.

    A call is the study's: present if any finding of that label (and side) is.
    A detector's or a segmentation's lesions are several findings of a label,
    numbered by each version's own ranking, so "lesion 1" of one version need
    not be "lesion 1" of the other: lesions are not paired, studies are.
    """

    def calls(version: str) -> dict[tuple[int, str, str], bool]:
        rows = session.execute(
            select(AnalysisRun.job_id, FindingRecord.label, FindingRecord.laterality,
                   FindingRecord.present)
            .join(FindingRecord, FindingRecord.run_id == AnalysisRun.id)
            .where(AnalysisRun.model_name == model_name, AnalysisRun.model_version == version,
                   AnalysisRun.outcome == Outcome.ANALYSED)
        )  # fmt: skip
        out: dict[tuple[int, str, str], bool] = {}
        for job, label, side, present in rows:
            if job is None:
                continue  # a run with no job (none is recorded so): nothing to pair it with
            key = (int(job), str(label), side or "")
            out[key] = out.get(key, False) or bool(present)
        return out

    first, second = calls(first_version), calls(second_version)
    both = sorted(first.keys() & second.keys())
    return [PairedCall(key[1], first[key], second[key]) for key in both]


def operational(session: Session, model_name: str, model_version: str) -> dict[str, Any]:
    """Runs by outcome, and the turnaround from the job's queueing to its result (seconds)."""
    outcomes = dict(
        session.execute(
            select(AnalysisRun.outcome, func.count())
            .where(
                AnalysisRun.model_name == model_name, AnalysisRun.model_version == model_version
            )
            .group_by(AnalysisRun.outcome)
        ).all()
    )
    pairs = session.execute(
        select(Job.created_at, AnalysisRun.created_at)
        .join(Job, Job.id == AnalysisRun.job_id)
        .where(AnalysisRun.model_name == model_name, AnalysisRun.model_version == model_version)
    ).all()
    seconds = sorted(
        (done - queued).total_seconds() for queued, done in pairs if queued and done
    )
    return {"outcomes": {str(k): int(v) for k, v in outcomes.items()}, "turnaround": seconds}
