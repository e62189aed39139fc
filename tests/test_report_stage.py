"""The report stage: analysis runs in the database become DICOM objects in the outbox.

Runs are recorded through the infer stage's own calls (tests/reportdata.py);
the objects are checked by reading them back (dicom_io/sr.read_findings), by
dciodvfy and against the outbox rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import select

from daemon.config import Config
from daemon.stages.report import Reporter
from db import audit, migrate
from db.audit import EventType
from db.chain import create_key
from db.models import AnalysisRun, DeliveryState, FindingRecord, OutboxItem, ReportState
from db.session import Database
from dicom_io.sr import finding_tracking_uid, read_findings
from tests import reportdata as rd
from tests.configs import write_config
from tests.dicom_validate import dciodvfy_errors


def make_config(tmp_path: Path, db_url: str, extra: str = "") -> Config:
    config = write_config(
        tmp_path,
        db_url,
        """
[report]
institution_name = "Test Hospital"

[[delivery.destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112
outputs = ["sr", "seg", "binary-seg", "pmap", "gsps", "summary"]

[[delivery.destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 11113
"""
        + extra,
    )
    create_key(config.audit_key_path)  # as `secondreader db upgrade` does
    return config


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'report.db'}"
    migrate.upgrade(url)
    return url


def outbox_rows(db: Database) -> list[OutboxItem]:
    with db.session() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def runs(db: Database) -> list[AnalysisRun]:
    with db.session() as s:
        return list(s.scalars(select(AnalysisRun).order_by(AnalysisRun.id)))


def assert_valid(path: Path) -> None:
    assert dciodvfy_errors(path) == [], path


def test_analysed_run_becomes_sr_and_seg_queued_per_destination(
    tmp_path: Path, db_url: str
) -> None:
    config = make_config(tmp_path, db_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    result = rd.analysed(files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [result])

    assert Reporter(db, config).run_once() == 1

    (run,) = runs(db)
    assert run.report_state == ReportState.REPORTED and run.report_error is None
    rows = outbox_rows(db)
    # One row per object per destination that takes its kind ("archive" the
    # default outputs), all waiting for the dispatcher.
    assert sorted((r.object_kind, r.destination) for r in rows) == [
        ("binary-seg", "pacs"),
        ("gsps", "archive"),
        ("gsps", "pacs"),
        ("pmap", "archive"),
        ("pmap", "pacs"),
        ("seg", "pacs"),
        ("sr", "archive"),
        ("sr", "pacs"),
        ("summary", "archive"),
        ("summary", "pacs"),
    ]
    assert {r.state for r in rows} == {DeliveryState.PENDING}
    assert {r.attempts for r in rows} == {0}
    sr_row = next(r for r in rows if r.object_kind == "sr")
    seg_row = next(r for r in rows if r.object_kind == "seg")
    assert sr_row.sop_instance_uid == run.sr_sop_instance_uid
    assert sr_row.sop_class_uid == Comprehensive3DSRStorage
    assert seg_row.sop_class_uid == SegmentationStorage
    # The first pass queues the SEG, then the SR that cites it; the second
    # pass the objects beside them, which take longer to build.
    first = [r.id for r in rows if r.object_kind in ("seg", "sr")]
    assert max(r.id for r in rows if r.object_kind == "seg") < sr_row.id
    assert max(first) < min(r.id for r in rows if r.object_kind not in ("seg", "sr"))
    expected_classes = {
        "binary-seg": SegmentationStorage,
        "pmap": "1.2.840.10008.5.1.4.1.1.30",
        "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
        "summary": "1.2.840.10008.5.1.4.1.1.7",
    }
    for row in rows:
        if row.object_kind in expected_classes:
            assert row.sop_class_uid == expected_classes[row.object_kind]
            extra = dcmread(config.storage.state_dir / row.path)
            assert extra.StudyInstanceUID == study_uid
            assert extra.PatientID == dcmread(files[0], stop_before_pixels=True).PatientID
            assert_valid(config.storage.state_dir / row.path)
    assert sr_row.path == f"outbox/{study_uid}/{sr_row.sop_instance_uid}.dcm"

    sr_path = config.storage.state_dir / sr_row.path
    seg_path = config.storage.state_dir / seg_row.path
    sr, seg = dcmread(sr_path), dcmread(seg_path)
    middle = dcmread(files[len(files) // 2], stop_before_pixels=True)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == study_uid
    assert sr.PatientID == middle.PatientID
    assert (sr.SeriesNumber, sr.SeriesDescription) == (
        9901,
        "AI RESULT - NOT VERIFIED - secondreader",
    )
    assert sr.InstitutionName == "Test Hospital"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert seg.SeriesNumber == 9902 and seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert "PredecessorDocumentsSequence" not in sr

    (finding,) = read_findings(sr)
    assert finding["probability"] == pytest.approx(0.87)
    assert finding["present"] is True
    assert finding["finding_type"] == rd.NODULE
    assert finding["referenced_sop_instance_uid"] == middle.SOPInstanceUID
    assert finding["graphic_type"] == "POLYLINE"
    tracking = finding_tracking_uid(study_uid, rd.ALGORITHM.device_uid, "nodule")
    assert finding["tracking_uid"] == tracking
    with db.session() as s:
        assert s.scalars(select(FindingRecord.tracking_uid)).all() == [tracking]
    # The SEG's segment carries the finding's tracking UID, and the SR cites the SEG.
    assert seg.SegmentSequence[0].TrackingUID == tracking
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files} <= evidence
    assert_valid(sr_path)
    assert_valid(seg_path)

    with db.session() as s:
        (event,) = audit.events(s, EventType.REPORT_CREATED)
        (extras,) = audit.events(s, EventType.REPORT_EXTRAS_CREATED)
    # SEG and SR for "pacs", SR for "archive"; then the 7 other rows.
    assert event.sop_instance_uid == sr.SOPInstanceUID and event.detail["outbox_items"] == 3
    assert extras.detail["outbox_items"] == 7
    assert extras.detail["kinds"] == ["binary-seg", "gsps", "pmap", "summary"]

    # Nothing is pending any more: a second pass builds and queues nothing.
    assert Reporter(db, config).run_once() == 0
    assert len(outbox_rows(db)) == 10
    db.dispose()


def test_rerun_of_the_same_model_supersedes_the_earlier_sr(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    reporter = Reporter(db, config)
    assert reporter.run_once() == 1
    first_sr_uid = runs(db)[0].sr_sop_instance_uid

    # The study comes again (one image re-sent): completed again, analysed again,
    # now with the finding below its threshold.
    rd.reopen(db, config.storage.spool_dir, files[0])
    rerun = rd.analysed(files, probability=0.2)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rerun])
    assert reporter.run_once() == 1

    first, second = runs(db)
    assert second.sr_sop_instance_uid not in (None, first_sr_uid)
    sr_path = config.storage.state_dir / f"outbox/{study_uid}/{second.sr_sop_instance_uid}.dcm"
    sr = dcmread(sr_path)
    (predecessor,) = sr.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == study_uid
    refs = [r for s in predecessor.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
    assert [r.ReferencedSOPInstanceUID for r in refs] == [first_sr_uid]
    (finding,) = read_findings(sr)
    # Absent: probability kept, the whole key image as region (no spot marked),
    # and so no saliency SEG either.
    assert finding["present"] is False and finding["probability"] == pytest.approx(0.2)
    key = dcmread(files[len(files) // 2], stop_before_pixels=True)
    columns, rows = float(key.Columns), float(key.Rows)
    assert finding["referenced_sop_instance_uid"] == key.SOPInstanceUID
    assert finding["graphic_data"] == [
        (0.0, 0.0), (columns, 0.0), (columns, rows), (0.0, rows), (0.0, 0.0),
    ]  # fmt: skip
    # Same model, same study, same label: the same tracking UID as the first report.
    first_findings = read_findings(
        dcmread(config.storage.state_dir / f"outbox/{study_uid}/{first_sr_uid}.dcm")
    )
    assert finding["tracking_uid"] == first_findings[0]["tracking_uid"]
    kinds = sorted(r.object_kind for r in outbox_rows(db) if r.run_id == second.id)
    # Two destinations; no saliency object and no GSPS for an absent finding,
    # but the summary image, which says "no nodule found".
    assert kinds == ["sr", "sr", "summary", "summary"]
    assert_valid(sr_path)
    db.dispose()


def test_not_run_outcome_becomes_a_not_run_sr(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.not_run(study_uid)])

    assert Reporter(db, config).run_once() == 1

    (run,) = runs(db)
    rows = outbox_rows(db)
    assert sorted(r.object_kind for r in rows) == ["sr", "sr", "summary", "summary"]
    sr_path = config.storage.state_dir / next(r.path for r in rows if r.object_kind == "sr")
    sr = dcmread(sr_path)
    assert sr.SOPInstanceUID == run.sr_sop_instance_uid
    assert sr.SeriesDescription == "AI NOT RUN - NO AI RESULT - secondreader"
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "AI analysis not performed"
    assert sr.CompletionFlag == "PARTIAL"
    assert read_findings(sr) == []
    texts = [item.TextValue for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert any("no model applies to MR" in t for t in texts)
    assert_valid(sr_path)
    db.dispose()


def test_segmentation_off_and_no_destinations(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(
        tmp_path,
        sqlite_url,
        """
[report]
segmentation = false
series_number = 777
series_description = "AI TEST SERIES"
""",
    )
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])

    assert Reporter(db, config).run_once() == 1

    # Built and kept in the outbox folder, but with no destination nothing is queued.
    assert outbox_rows(db) == []
    (run,) = runs(db)
    assert run.report_state == ReportState.REPORTED
    written = sorted((config.storage.state_dir / "outbox" / study_uid).glob("*.dcm"))
    # The default outputs, less the saliency objects (segmentation = false).
    classes = {str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in written}
    assert classes == {
        Comprehensive3DSRStorage,
        "1.2.840.10008.5.1.4.1.1.11.1",  # GSPS
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    }
    sr_path = next(p for p in written if p.stem == run.sr_sop_instance_uid)
    sr = dcmread(sr_path)
    assert (sr.SeriesNumber, sr.SeriesDescription) == (777, "AI TEST SERIES")
    assert_valid(sr_path)
    db.dispose()


def test_missing_images_fail_the_run_visibly(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    for spooled in config.storage.spool_dir.rglob("*.dcm"):
        spooled.unlink()

    assert Reporter(db, config).run_once() == 0

    (run,) = runs(db)
    assert run.report_state == ReportState.FAILED
    assert "image missing from the spool" in (run.report_error or "")
    assert outbox_rows(db) == []
    with db.session() as s:
        (event,) = audit.events(s, EventType.REPORT_FAILED)
    assert event.study_instance_uid == study_uid
    # A failed run is not retried on every tick.
    assert Reporter(db, config).run_once() == 0
    db.dispose()


def test_unreadable_saliency_file_fails_the_run_visibly(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    (run,) = runs(db)
    assert run.saliency_path is not None
    (config.storage.state_dir / run.saliency_path).write_bytes(b"not an npz file")

    assert Reporter(db, config).run_once() == 0

    (run,) = runs(db)
    assert run.report_state == ReportState.FAILED
    assert (run.report_error or "").startswith("cannot read the run back")
    assert outbox_rows(db) == []
    db.dispose()


def test_reports_retry_builds_a_failed_report_again(tmp_path: Path, sqlite_url: str) -> None:
    """The spool is restored (from backup, say): `secondreader reports retry` reports the run."""
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    backup = tmp_path / "backup"
    shutil.copytree(config.storage.spool_dir, backup)
    shutil.rmtree(config.storage.spool_dir)
    assert Reporter(db, config).run_once() == 0
    assert runs(db)[0].report_state == ReportState.FAILED
    shutil.copytree(backup, config.storage.spool_dir)

    cli = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "reports", "retry"],
        env={**os.environ, "SECONDREADER_CONFIG": str(tmp_path / "secondreader.toml")},
        capture_output=True,
        text=True,
        check=True,
    )
    (run,) = runs(db)
    assert f"re-queued 1 failed report(s): runs [{run.id}]" in cli.stdout
    assert (run.report_state, run.report_error) == (ReportState.PENDING, None)
    assert Reporter(db, config).run_once() == 1
    assert runs(db)[0].report_state == ReportState.REPORTED
    with db.session() as s:
        (event,) = audit.events(s, EventType.REPORT_REQUEUED)
    assert (event.actor, event.study_instance_uid, event.detail) == (
        "cli",
        study_uid,
        {"run_id": run.id},
    )
    db.dispose()


def test_a_result_sr_that_cannot_be_built_becomes_a_not_run_sr(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is silent: the radiologist gets an SR saying the result could not be encoded."""
    config = make_config(tmp_path, sqlite_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])

    def broken(*_args: object, **_kwargs: object) -> None:
        # As highdicom words it: the value it refused is quoted (here, a name).
        raise ValueError("Value 'Doe^Jane' is not valid for attribute 'PersonName'")

    monkeypatch.setattr("daemon.stages.report.build_ai_result_sr", broken)
    assert Reporter(db, config).run_once() == 1

    (run,) = runs(db)
    assert run.report_state == ReportState.REPORTED
    (path,) = {(config.storage.state_dir / i.path) for i in outbox_rows(db)}
    sr = dcmread(path)
    assert sr.StudyInstanceUID == study_uid
    assert sr.SeriesDescription == config.report.not_run_series_description
    assert read_findings(sr) == []
    texts = [str(item.get("TextValue", "")) for item in sr.ContentSequence]
    assert any(
        "the AI result could not be written as a DICOM SR (ValueError: Value '<value>'" in t
        for t in texts
    )
    assert not any("Doe" in t for t in texts)
    assert_valid(path)
    db.dispose()


def test_sr_without_seg_reads_only_the_headers_it_describes(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Without a SEG the SR pass reads few files; the SR still lists every image.

    The images no finding points at are in the evidence, from their database
    rows; the key image is read and described in full in the Image Library.
    """
    config = make_config(
        tmp_path,
        sqlite_url,
        '[[delivery.destinations]]\nname = "viewer"\nae_title = "VIEWER"\n'
        'host = "127.0.0.1"\nport = 11114\noutputs = ["sr"]\n',
    )
    config.delivery.destinations = config.delivery.destinations[2:]
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct", slices=8)
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    reporter = Reporter(db, config)
    with db.session() as s:
        (run_id,) = [r.id for r in s.scalars(select(AnalysisRun))]
    assert reporter.report(run_id)

    (row,) = [r for r in outbox_rows(db) if r.object_kind == "sr"]
    sr_path = config.storage.state_dir / row.path
    sr = dcmread(sr_path)
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    (finding,) = read_findings(sr)
    key = finding["referenced_sop_instance_uid"]
    (library,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    entries = {
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: len(
            image.get("ContentSequence", [])
        )
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    }
    assert set(entries) == {key} and entries[key] > 0
    # Every image's group carries the series' frame of reference, read or not.
    for group in library.ContentSequence:
        uids = [i.UID for i in group.ContentSequence if i.ValueType == "UIDREF"]
        assert uids == [str(dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID)]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == sources
    assert sr.PatientID == dcmread(files[0], stop_before_pixels=True).PatientID
    assert_valid(sr_path)
    db.dispose()
