"""The results store: analysis runs and their findings as the analyse stage records them.

`record_run` writes a run inside the queue's `finish_job` transaction (db/queue.py);
`load_run_result` reads it back as the AnalysisResult it was recorded from (report stage).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit
from db.audit import EventType
from db.models import (
    AnalysisRun,
    FindingRecord,
    ReportState,
    Study,
)
from db.monitoring import record_observation
from db.saliency import read_label_map, read_saliency, write_saliency
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
)

if TYPE_CHECKING:
    from db.queue import ClaimedJob


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
            evaluation=tuple((str(k), str(v)) for k, v in extra.get("evaluation", [])),
        )
    findings = [_finding_from_record(f) for f in sorted(run.findings, key=lambda f: f.id)]
    saliency_map = (
        read_saliency(state_dir / run.saliency_path) if run.saliency_path and saliency else None
    )
    # A segmentation's regions travel in the same file, under their own keys:
    # read without the map (a small part of it), for the SEG the SR cites.
    path = state_dir / run.saliency_path if run.saliency_path else None
    label_map = read_label_map(path) if path is not None and path.is_file() else None
    return AnalysisResult(
        study_instance_uid=study_uid,
        series_instance_uid=run.series_instance_uid,
        outcome=Outcome(run.outcome),
        algorithm=algorithm,
        findings=findings,
        reason=run.reason,
        saliency=saliency_map,
        label_map=label_map,
        provenance=list(run.provenance.get("steps", [])),
    )


def record_run(
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
            "evaluation": [list(line) for line in algo.evaluation],
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
        run.saliency_path = write_saliency(state_dir, job.study_instance_uid, run.id, result)
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
                laterality=f.laterality,
                view=f.view,
                views=list(f.views) if f.views else None,
                lesion=f.lesion,
                diameter_mm=f.diameter_mm,
                volume_ml=f.volume_ml,
                mean_intensity=f.mean_intensity,
                max_intensity=f.max_intensity,
                region_3d=[list(point) for point in f.region_3d] if f.region_3d else None,
            )
        )
    session.flush()
    record_observation(session, run, result, now)
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
            {"label": f.key, "probability": round(float(f.probability), 4), "present": f.present}
            for f in result.findings
        ],
        # Provenance: each preprocessing step with its parameters and timing.
        preprocessing=[
            {"name": step.get("name"), "parameters": step.get("parameters")}
            for step in result.provenance
        ],
    )
    return run.id


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
        laterality=f.laterality,
        view=f.view,
        views=tuple(f.views or ()),
        lesion=f.lesion,
        diameter_mm=f.diameter_mm,
        volume_ml=f.volume_ml,
        mean_intensity=f.mean_intensity,
        max_intensity=f.max_intensity,
        region_3d=(tuple((float(x), float(y), float(z)) for x, y, z in f.region_3d)
                   if f.region_3d else None),
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
