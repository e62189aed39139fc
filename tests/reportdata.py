"""Test data for the report and deliver stages: received studies and recorded analyses.

A study goes in through the receive stage's own calls (spool write, then
`record_instance`); an analysis is recorded through the infer stage's own
calls (completion queues a job, `claim_next` takes it, `finish_job` writes
the AnalysisRun and FindingRecord rows and the saliency file). Only the
model is left out, so the report stage sees exactly what it sees in service.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmread

from db.ingest import StoredInstance, record_instance
from db.models import utcnow
from db.queue import claim_next, finish_job
from db.session import Database
from db.studies import complete_stable_studies
from dicom_io.spool import Spool
from dicom_io.synthetic import write_ct_series
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
    SaliencyMap,
)

NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung")
ALGORITHM = AlgorithmInfo(
    name="ct-nodule-test",
    version="1.0.0",
    manufacturer="secondreader tests",
    device_uid="1.2.826.0.1.3680043.8.498.4242",
    parameters={"threshold": "0.5"},
    evaluation=(("Sensitivity", "0.85 (17/20; 95 % CI 0.64-0.95)"),),
)


def ct_study(folder: Path, *, slices: int = 6, size: int = 64, seed: int = 0) -> list[Path]:
    """A small synthetic chest CT: a bright sphere (the "nodule") in soft tissue."""
    z, y, x = np.mgrid[0:slices, 0:size, 0:size]
    volume = np.full((slices, size, size), 40.0)
    volume[(z - slices // 2) ** 2 * 9 + (y - size // 2) ** 2 + (x - size // 3) ** 2 < 60] = 300.0
    return write_ct_series(volume, folder, seed=seed)


def receive(db: Database, spool_dir: Path, files: list[Path], calling_ae: str = "TEST") -> str:
    """Put files into the spool and the database as the receive stage does; the study UID."""
    spool = Spool(spool_dir, fsync=False)
    study_uid = ""
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        study_uid = str(ds.StudyInstanceUID)
        relative = spool.relative_path(study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        size = spool.write(relative, f.read_bytes())
        with db.session() as s:
            record_instance(
                s,
                StoredInstance(
                    study_instance_uid=study_uid,
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    modality=str(ds.Modality),
                    path=relative,
                    size_bytes=size,
                    calling_ae=calling_ae,
                ),
            )
    return study_uid


def analysed(files: list[Path], *, probability: float = 0.87) -> AnalysisResult:
    """An analysed result: one finding on the middle slice, and its saliency map."""
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    middle = headers[len(headers) // 2]
    rows, cols = int(middle.Rows), int(middle.Columns)
    frames = np.zeros((len(headers), rows, cols), dtype=np.float32)
    yy, xx = np.mgrid[0:rows, 0:cols]
    blob = np.exp(-((yy - rows / 2) ** 2 + (xx - cols / 3) ** 2) / (2 * 4.0**2))
    for k in range(len(headers) // 2 - 1, len(headers) // 2 + 2):
        frames[k] = (probability * blob).astype(np.float32)
    return AnalysisResult(
        study_instance_uid=str(middle.StudyInstanceUID),
        series_instance_uid=str(middle.SeriesInstanceUID),
        outcome=Outcome.ANALYSED,
        algorithm=ALGORITHM,
        findings=[
            Finding(
                label="nodule",
                finding_type=NODULE,
                finding_site=LUNG,
                probability=probability,
                threshold=0.5,
                location=ImageLocation(
                    sop_instance_uid=str(middle.SOPInstanceUID),
                    sop_class_uid=str(middle.SOPClassUID),
                    point=(cols / 3, rows / 2),
                    box=(cols / 3 - 6, rows / 2 - 6, cols / 3 + 6, rows / 2 + 6),
                ),
            )
        ],
        saliency=SaliencyMap(
            series_instance_uid=str(middle.SeriesInstanceUID),
            source_sop_instance_uids=[str(h.SOPInstanceUID) for h in headers],
            frames=frames,
        ),
        provenance=[{"step": "window", "center": 40, "width": 400}],
    )


def not_run(study_uid: str, reason: str = "no model applies to MR") -> AnalysisResult:
    return AnalysisResult(
        study_instance_uid=study_uid,
        series_instance_uid=None,
        outcome=Outcome.NOT_APPLICABLE,
        algorithm=None,
        reason=reason,
    )


def record_analysis(
    db: Database, state_dir: Path, study_uid: str, results: list[AnalysisResult]
) -> None:
    """Complete the study, take its job and record `results` as the infer stage does."""
    later = utcnow() + timedelta(seconds=1)
    with db.session() as s:
        complete_stable_studies(s, stable_seconds=0.001, max_seconds=3600, now=later)
    with db.session() as s:
        job = claim_next(s, "tests", lease_seconds=60, now=later)
    assert job is not None and job.study_instance_uid == study_uid, "no job for the study"
    with db.session() as s:
        finish_job(s, job, results, state_dir=state_dir, now=later)


def reopen(db: Database, spool_dir: Path, file: Path) -> None:
    """Receive one image again: the study re-opens, so its next completion queues a re-run."""
    receive(db, spool_dir, [file])
