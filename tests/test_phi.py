"""No patient data in logs or error columns, whatever the images carry.

Two studies with distinctive values in every patient attribute (UTF-8,
ISO_IR 192), a malformed birth date and other broken Type 2 values go the
whole way through a real daemon with the built-in models: received,
analysed, reported. The SR carries the patient as the header does; the log,
the audit trail and every error column carry none of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement
from sqlalchemy import select

from db.models import AnalysisRun, AuditEvent, Job, ReportState
from dicom_io.synthetic import write_ct_series
from model.phantom import phantom_volume
from tests.conftest import storescu
from tests.dicom_validate import dciodvfy_errors
from tests.dicomgen import DaemonDB, sample_file

NAME = "Zqwxé^Ünïcødé^Ĳsbrand"
PHI = {
    "PatientName": NAME,
    "PatientID": "PHI-ID-77315",
    "OtherPatientIDs": "OTHER-ID-88421",
    "PatientAddress": "12 Phantomstraße Qwzxville",
    "PatientMotherBirthName": "Mütterlich^Qwzx",
    "PatientComments": "Distinctive comment Xyzzy-31337",
    "ReferringPhysicianName": "Referrer^Qwzxé",
    "AccessionNumber": "ACC-99271",
    "IssuerOfPatientID": "ISSUER-Q7",
}
MALFORMED_BIRTH_DATE = "1923-04-19"  # DA is YYYYMMDD


def _with_phi(path: Path, *, drop: tuple[str, ...] = ()) -> None:
    ds = dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    # Written raw: pydicom would refuse to encode the malformed value itself.
    ds["PatientBirthDate"] = DataElement(0x00100030, "DA", MALFORMED_BIRTH_DATE)
    ds["PatientSex"] = DataElement(0x00100040, "CS", "QQ")
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)


def _values() -> list[str]:
    parts = {p for v in PHI.values() for p in v.replace("^", " ").split() if len(p) >= 4}
    return sorted({*PHI.values(), *parts, MALFORMED_BIRTH_DATE, "19230419"})


def test_no_patient_data_in_logs_audit_or_errors(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    volume, _ = phantom_volume(3, n_slices=40, rows=256, cols=256, lesion=True)
    nodule = write_ct_series(volume, tmp_path / "nodule", spacing=(2.5, 1.4, 1.4), seed=3)
    for path in nodule:
        _with_phi(path)
    # A second study: one small CT slice, without Modality, Study ID or Study Date.
    small = tmp_path / "small.dcm"
    small.write_bytes(sample_file("CT_small.dcm").read_bytes())
    _with_phi(small, drop=("Modality", "StudyID", "StudyDate", "StudyTime"))

    d = daemon_factory("\n[report]\ncheck_interval_seconds = 0.5\n").start()
    for files in (nodule, [small]):
        r = storescu(d.port, files)
        assert r.returncode == 0, r.stderr
    db = DaemonDB.of(d.state)

    def reported() -> list[AnalysisRun]:
        with db.db.session() as s:
            runs = list(s.scalars(select(AnalysisRun)))
        done = [r for r in runs if r.report_state != ReportState.PENDING]
        return runs if len(runs) >= 2 and len(done) == len(runs) else []

    runs = d.wait_for(reported, timeout=300, interval=0.5)
    assert {r.report_state for r in runs} == {ReportState.REPORTED}
    assert {r.outcome for r in runs} == {"analysed", "not_applicable"}

    # The SRs carry the patient, as the headers do: the malformed values are empty.
    srs = [
        p
        for p in (d.state / "outbox").rglob("*.dcm")
        if dcmread(p, stop_before_pixels=True).Modality == "SR"
    ]
    assert len(srs) == 2
    for path in sorted((d.state / "outbox").rglob("*.dcm")):
        ds = dcmread(path)
        assert str(ds.PatientName) == NAME and ds.PatientID == PHI["PatientID"]
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert dciodvfy_errors(path) == [], path

    # ...and nothing else does.
    with db.db.session() as s:
        stored = [
            *(
                e.actor + json.dumps(e.detail, ensure_ascii=False)
                for e in s.scalars(select(AuditEvent))
            ),
            *(str(j.last_error) for j in s.scalars(select(Job))),
            *(f"{r.reason} {r.report_error}" for r in s.scalars(select(AnalysisRun))),
        ]
    db.close()
    assert d.stop() == 0
    log = d.log()
    assert "secondreader stopped" in log
    for value in _values():
        assert value not in log, value
        assert not [text for text in stored if value in text], value
