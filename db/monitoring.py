"""What governance reads and writes of each analysed run: its observation.

`record_observation` is called by db/results.py as the run is recorded, in
the same transaction. The readers serve the monitoring page, drift
(daemon/stages/monitor/), subgroups and the registry export.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    FindingRecord,
    Instance,
    RunObservation,
    Series,
)
from db.reviews import latest_decision
from model.results import AnalysisResult

# The image metadata of an observation (model/observation.py): what the
# registry export takes of it as it is.
ACQUISITION = (
    "modality", "body_part", "manufacturer", "manufacturer_model", "kernel",
    "slice_thickness", "kvp", "pixel_spacing", "contrast", "p01", "p50", "p99", "noise",
)  # fmt: skip
# model/observation.py's keys that are columns of run_observations.
_COLUMNS = (*ACQUISITION, "patient_sex", "age_band")


def record_observation(
    session: Session, run: AnalysisRun, result: AnalysisResult, now: datetime
) -> None:
    """The run's observation, its score and its call; nothing for a run that did not analyse."""
    algo = result.algorithm
    if not result.observation or algo is None or not result.findings:
        return
    calling_ae = None
    if result.series_instance_uid:
        calling_ae = session.scalar(
            select(Instance.calling_ae)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.series_instance_uid == result.series_instance_uid)
            .order_by(Instance.id)
            .limit(1)
        )
    session.add(
        RunObservation(
            run_id=run.id,
            model_name=algo.name,
            model_version=algo.version,
            analysed_at=now,
            score=max(float(f.probability) for f in result.findings),
            positive=any(f.present for f in result.findings),
            calling_ae=calling_ae,
            **_columns(result.observation),
        )
    )


def _columns(observation: Mapping[str, object]) -> dict[str, Any]:
    return {k: observation.get(k) for k in _COLUMNS}


def observations(
    session: Session,
    *,
    model_name: str | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Observations in time order, for one model (and version) and period, as plain rows."""
    stmt = select(RunObservation).order_by(RunObservation.analysed_at, RunObservation.run_id)
    if model_name is not None:
        stmt = stmt.where(RunObservation.model_name == model_name)
    if model_version is not None:
        stmt = stmt.where(RunObservation.model_version == model_version)
    if since is not None:
        stmt = stmt.where(RunObservation.analysed_at >= since)
    if until is not None:
        stmt = stmt.where(RunObservation.analysed_at < until)
    names = [c.name for c in RunObservation.__table__.columns]
    return [{n: getattr(o, n) for n in names} for o in session.scalars(stmt)]


def registry_rows(
    session: Session, *, since: datetime | None = None, until: datetime | None = None
) -> list[dict[str, Any]]:
    """One row per finding of each analysed, observed run: the registry export's content.

    What leaves with it is chosen here, column by column: acquisition,
    AI result, the latest review decision, sex and age band. No name, ID,
    UID, accession number or date (the week of analysis only).
    """
    decision, on_latest = latest_decision()
    stmt = (
        select(
            RunObservation,
            FindingRecord,
            decision.decision,
            AnalysisRun.mode,
            AnalysisRun.review_selection,
        )  # fmt: skip
        .join(AnalysisRun, AnalysisRun.id == RunObservation.run_id)
        .join(FindingRecord, FindingRecord.run_id == RunObservation.run_id)
        .outerjoin(decision, on_latest)
        .order_by(RunObservation.analysed_at, FindingRecord.id)
    )
    if since is not None:
        stmt = stmt.where(RunObservation.analysed_at >= since)
    if until is not None:
        stmt = stmt.where(RunObservation.analysed_at < until)
    out = []
    for o, f, decided, mode, selection in session.execute(stmt):
        year, week, _ = o.analysed_at.isocalendar()
        out.append(
            {
                "analysed_week": f"{year}-W{week:02d}",
                **{k: getattr(o, k) for k in ACQUISITION},
                "model_name": o.model_name,
                "model_version": o.model_version,
                "model_mode": mode,
                "finding": str(f.finding_code.get("meaning", f.label)),
                "finding_code": "{}:{}".format(
                    f.finding_code.get("scheme", ""), f.finding_code.get("value", "")
                ),
                "probability": round(float(f.probability), 4),
                "threshold": round(float(f.threshold), 4),
                "ai_present": bool(f.present),
                "review_selection": selection,
                "review_decision": decided,
                "patient_sex": o.patient_sex,
                "patient_age_band": o.age_band,
            }
        )
    return out


def record_export(session: Session, actor: str, *, fmt: str, rows: int) -> None:
    """Who took the registry export, in which format, and how many rows left with it."""
    audit.record(session, EventType.MONITORING_EXPORTED, actor, format=fmt, rows=rows)
