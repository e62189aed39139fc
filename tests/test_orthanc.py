"""Report and deliver into a real PACS: Orthanc (Debian package), started by each test.

The daemon is the real `secondreader serve`; images reach it by dcmtk storescu.
The first two tests record the analysis through the infer stage's own calls
(tests/reportdata.py) so that they do not depend on a model; the last one
has no shortcut at all: storescu -> daemon -> worker -> SR in Orthanc.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import select

from daemon.config import OUTPUT_KINDS, Config, load_config
from daemon.factories import scp_settings
from daemon.stages.deliver import Dispatcher
from daemon.stages.report import Reporter
from db import migrate
from db.audit import EventType
from db.models import (
    AnalysisRun,
    AncillaryInstance,
    AuditEvent,
    DeliveryState,
    FindingRecord,
    Job,
    OutboxItem,
    Study,
)
from db.session import Database
from dicom_io.scp import StorageSCP
from dicom_io.sr import read_findings
from model.results import Outcome
from tests import reportdata as rd
from tests.conftest import DaemonProcess, free_port, storescu
from tests.dicom_validate import dciodvfy_errors

if TYPE_CHECKING:
    from tests.orthanc import Orthanc


# The daemon's own completion is slowed down where the test records the
# analysis itself, and no worker runs in the daemon: the test is the worker.
NO_WORKER = {
    "SECONDREADER_WORKER__IN_PROCESS": "false",
    "SECONDREADER_COMPLETION__STABLE_SECONDS": "3600",
}


# The delivery mechanics tests need two objects of two classes; the first
# test sends every kind there is.
TWO_OBJECTS = ("sr", "seg")


def delivery_config(
    orthanc: Orthanc, *, commitment: bool = False, outputs: Sequence[str] = TWO_OBJECTS
) -> str:
    return f"""
[report]
check_interval_seconds = 0.3

[delivery]
check_interval_seconds = 0.3
retry_base_seconds = 0.5
retry_max_seconds = 1
dead_letter_after_seconds = 300
commitment_timeout_seconds = 20

[[delivery.destinations]]
name = "orthanc"
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
storage_commitment = {str(commitment).lower()}
timeout_seconds = 5
outputs = {json.dumps(list(outputs))}
"""


def knows_our_scp(orthanc: Orthanc, daemon: DaemonProcess) -> None:
    """Orthanc calls our SCP back (storage commitment reports): it must know our AE."""
    orthanc.config["DicomModalities"] = {
        "secondreader": {"AET": "SECONDREADER", "Host": "127.0.0.1", "Port": daemon.port}
    }


def open_db(daemon: DaemonProcess) -> Database:
    return Database(f"sqlite:///{daemon.state / 'secondreader.db'}")


def outbox(db: Database) -> list[OutboxItem]:
    with db.session() as s:
        return list(s.scalars(select(OutboxItem).order_by(OutboxItem.id)))


def runs(db: Database) -> list[AnalysisRun]:
    with db.session() as s:
        return list(s.scalars(select(AnalysisRun).order_by(AnalysisRun.id)))


def all_done(db: Database, expected: int) -> bool:
    items = outbox(db)
    return len(items) == expected and all(i.state == DeliveryState.DONE for i in items)


def send_to_daemon(daemon: DaemonProcess, files: list[Path]) -> None:
    run = storescu(daemon.port, files)
    assert run.returncode == 0, run.stderr


def by_class(instances: list[dict], sop_class: str) -> list[dict]:
    return [i for i in instances if i["SOPClassUID"] == sop_class]


def fetch(orthanc: Orthanc, instance: dict, folder: Path):
    """Download an instance as Orthanc stores it; (dataset, path)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{instance['SOPInstanceUID']}.dcm"
    path.write_bytes(orthanc.get_bytes(f"/instances/{instance['ID']}/file"))
    return dcmread(path), path


# Every output kind a classifier's result has: all but a segmentation model's
# SEG of its regions (that one reaches Orthanc in tests/test_viewer_seg.py).
CLASSIFIER_KINDS = tuple(kind for kind in OUTPUT_KINDS if kind != "regions")

# What each output kind is in the PACS (daemon/config.py OUTPUT_KINDS).
KIND_CLASSES = {
    "sr": Comprehensive3DSRStorage,
    "seg": SegmentationStorage,
    "binary-seg": SegmentationStorage,
    "regions": SegmentationStorage,
    "pmap": "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map, deflated
    "gsps": "1.2.840.10008.5.1.4.1.1.11.1",
    "summary": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
}


def test_every_output_kind_reaches_orthanc_in_the_study_of_the_images_and_is_committed(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory()
    config = delivery_config(orthanc, commitment=True, outputs=CLASSIFIER_KINDS)
    daemon = daemon_factory(config, env=NO_WORKER)
    knows_our_scp(orthanc, daemon)
    orthanc.start()
    daemon.start()
    files = rd.ct_study(tmp_path / "ct")
    send_to_daemon(daemon, files)
    # The PACS has the images too (the modality sent them there as well).
    to_pacs = storescu(orthanc.dicom_port, files, aec=orthanc.aet)
    assert to_pacs.returncode == 0, to_pacs.stderr
    db = open_db(daemon)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rd.record_analysis(db, daemon.state, study_uid, [rd.analysed(files)])

    n = len(CLASSIFIER_KINDS)
    daemon.wait_for(lambda: all_done(db, n), timeout=60)

    items = outbox(db)
    assert sorted(i.object_kind for i in items) == sorted(CLASSIFIER_KINDS)
    # Done only once Orthanc reported them committed (N-EVENT-REPORT to our SCP).
    assert {i.commitment_state for i in items} == {"committed"}
    assert {i.attempts for i in items} == {1}
    # One storage commitment per delivery: the report stage's first pass (SEG
    # and SR) and its second (the other objects) may go out together or apart.
    transactions = {i.commitment_transaction_uid for i in items}
    assert 1 <= len(transactions) <= 2
    counts = re.findall(r"storage commitment \S+ from ORTHANC: (\d+) committed, (\d+) failed",
                        daemon.log())  # fmt: skip
    assert len(counts) == len(transactions)
    assert sum(int(c) for c, _ in counts) == n and {f for _, f in counts} == {"0"}

    instances = orthanc.study_instances(study_uid)
    assert len(instances) == len(files) + n
    by_uid = {i["SOPInstanceUID"]: i for i in instances}
    fetched = {}
    for item in items:
        # Each object is in the PACS as what it is, in the study of the images,
        # and still valid after the round trip (the map deflated, as sent).
        entry = by_uid[item.sop_instance_uid]
        assert entry["SOPClassUID"] == KIND_CLASSES[item.object_kind]
        ds, path = fetch(orthanc, entry, tmp_path / "from-orthanc")
        assert ds.StudyInstanceUID == study_uid
        assert dciodvfy_errors(path) == [], (item.object_kind, path)
        fetched[item.object_kind] = (ds, path)
    (run,) = runs(db)
    sr, seg = fetched["sr"][0], fetched["seg"][0]
    assert sr.SOPInstanceUID == run.sr_sop_instance_uid
    assert fetched["pmap"][0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    (finding,) = read_findings(sr)
    middle = dcmread(files[len(files) // 2], stop_before_pixels=True)
    assert finding["probability"] == 0.87 and finding["present"] is True
    assert finding["finding_type"] == rd.NODULE and finding["finding_site"] == rd.LUNG
    # The image the finding points at is in Orthanc, in the same study.
    assert finding["referenced_sop_instance_uid"] == middle.SOPInstanceUID
    assert middle.SOPInstanceUID in {i["SOPInstanceUID"] for i in instances}
    assert seg.SegmentSequence[0].TrackingUID == finding["tracking_uid"]
    with db.session() as s:
        assert s.scalars(select(FindingRecord.tracking_uid)).all() == [finding["tracking_uid"]]
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced <= {i["SOPInstanceUID"] for i in instances}
    assert daemon.stop() == 0
    db.dispose()


def test_pacs_down_and_daemon_restarted_every_result_delivered_exactly_once(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory()  # configured, not started: the PACS is down
    daemon = daemon_factory(delivery_config(orthanc), env=NO_WORKER).start()
    db = open_db(daemon)
    analysed_files = rd.ct_study(tmp_path / "ct-a", seed=1)
    not_run_files = rd.ct_study(tmp_path / "ct-b", seed=2)
    studies = []
    for files, result in (
        (analysed_files, rd.analysed(analysed_files)),
        (not_run_files, None),
    ):
        send_to_daemon(daemon, files)
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        rd.record_analysis(
            db, daemon.state, study_uid, [result or rd.not_run(study_uid, "QC: test")]
        )
        studies.append(study_uid)

    # SR + SEG for the analysed study, one SR for the other: tried, failed.
    daemon.wait_for(
        lambda: len(outbox(db)) == 3 and all(i.attempts >= 1 for i in outbox(db)), timeout=30
    )
    assert {i.state for i in outbox(db)} == {DeliveryState.PENDING}
    assert all("AssociationFailed" in (i.last_error or "") for i in outbox(db))
    assert daemon.stop() == 0

    # A new daemon process takes the retries over from the database.
    before = {i.id: i.attempts for i in outbox(db)}
    daemon.start()
    daemon.wait_for(lambda: all(i.attempts > before[i.id] for i in outbox(db)), timeout=30)
    orthanc.start()
    daemon.wait_for(lambda: all_done(db, 3), timeout=30)
    assert all(i.attempts >= 2 for i in outbox(db))

    # A few more ticks: nothing is sent again.
    settled = {i.id: i.attempts for i in outbox(db)}
    time.sleep(1.5)
    assert {i.id: i.attempts for i in outbox(db)} == settled
    analysed_run, not_run_run = runs(db)
    for study_uid, run, n_seg in ((studies[0], analysed_run, 1), (studies[1], not_run_run, 0)):
        instances = orthanc.study_instances(study_uid)
        # Exactly one SR per run, the one the run recorded; no second set after the restart.
        assert [i["SOPInstanceUID"] for i in by_class(instances, Comprehensive3DSRStorage)] == [
            run.sr_sop_instance_uid
        ]
        assert len(by_class(instances, SegmentationStorage)) == n_seg
    (sr_entry,) = by_class(orthanc.study_instances(studies[1]), Comprehensive3DSRStorage)
    sr, sr_path = fetch(orthanc, sr_entry, tmp_path / "from-orthanc")
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "AI analysis not performed"
    assert dciodvfy_errors(sr_path) == []
    for path in (daemon.state / "outbox").rglob("*.dcm"):
        assert dciodvfy_errors(path) == [], path
    assert daemon.stop() == 0
    db.dispose()


def test_storescu_to_daemon_to_orthanc_without_shortcuts(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    orthanc = orthanc_factory().start()
    daemon = daemon_factory(
        delivery_config(orthanc),
        env={"SECONDREADER_WORKER__POLL_SECONDS": "0.3", "SECONDREADER_WORKER__DEVICE": "cpu"},
    ).start()
    files = rd.ct_study(tmp_path / "ct")
    send_to_daemon(daemon, files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    db = open_db(daemon)

    # Received, completed, analysed by the configured models, reported, delivered.
    daemon.wait_for(
        lambda: outbox(db) and all(i.state == DeliveryState.DONE for i in outbox(db)),
        timeout=120,
    )

    (run,) = runs(db)
    instances = orthanc.study_instances(study_uid)
    (sr_entry,) = by_class(instances, Comprehensive3DSRStorage)
    assert sr_entry["SOPInstanceUID"] == run.sr_sop_instance_uid
    sr, sr_path = fetch(orthanc, sr_entry, tmp_path / "from-orthanc")
    assert sr.StudyInstanceUID == study_uid
    assert dciodvfy_errors(sr_path) == []
    with db.session() as s:
        findings = list(s.scalars(select(FindingRecord).order_by(FindingRecord.id)))
    if run.outcome == Outcome.ANALYSED:
        read = read_findings(sr)
        # A DS holds at most 16 characters: the SR keeps ~12 significant digits.
        assert [f["probability"] for f in read] == pytest.approx(
            [f.probability for f in findings], rel=1e-9, abs=1e-12
        )
        assert [f["tracking_uid"] for f in read] == [f.tracking_uid for f in findings]
    else:
        # No model applies (or none is installed): the SR says so, and why.
        assert sr.ConceptNameCodeSequence[0].CodeMeaning == "AI analysis not performed"
        texts = " ".join(i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT")
        assert run.reason and run.reason in texts
    assert daemon.stop() == 0
    db.dispose()


# -- storage commitment reports that come late, or say "failed" ---------------


def commitment_setup(tmp_path: Path, orthanc: Orthanc) -> tuple[Config, Database, int]:
    """In-process stages with a reported study; Orthanc knows our SCP at a port not yet open."""
    scp_port = free_port()
    knows_our_scp_at(orthanc, scp_port)
    orthanc.start()
    path = tmp_path / "secondreader.toml"
    path.write_text(
        f"""
[scp]
host = "127.0.0.1"
port = {scp_port}

[storage]
state_dir = "{tmp_path / "state"}"
fsync = false
"""
        + delivery_config(orthanc, commitment=True).replace(
            "commitment_timeout_seconds = 20", "commitment_timeout_seconds = 1"
        )
    )
    config = load_config(path, environ={})
    config.storage.state_dir.mkdir(parents=True)
    migrate.upgrade(config.database_url)
    db = Database(config.database_url)
    files = rd.ct_study(tmp_path / "ct")
    study_uid = rd.receive(db, config.storage.spool_dir, files)
    rd.record_analysis(db, config.storage.state_dir, study_uid, [rd.analysed(files)])
    assert Reporter(db, config).run_once() == 1
    return config, db, scp_port


def knows_our_scp_at(orthanc: Orthanc, port: int) -> None:
    orthanc.config["DicomModalities"] = {
        "secondreader": {"AET": "SECONDREADER", "Host": "127.0.0.1", "Port": port}
    }


def our_scp(config: Config, dispatcher: Dispatcher) -> StorageSCP:
    scp = StorageSCP(
        scp_settings(config), lambda _obj: 0xA700, on_commitment=dispatcher.on_commitment
    )
    scp.start()
    return scp


def wait(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.1)


def wait_report_lost(orthanc: Orthanc) -> None:
    """Until Orthanc has tried to report to our SCP, and found nobody listening."""
    wait(
        lambda: (
            'connecting to AET "SECONDREADER"' in orthanc.log()
            and "Connection refused" in orthanc.log()
        )
    )


def test_late_commitment_report_means_sent_and_asked_again(tmp_path: Path, orthanc_factory) -> None:
    orthanc = orthanc_factory()
    config, db, _port = commitment_setup(tmp_path, orthanc)
    dispatcher = Dispatcher(db, config)

    # Stored and asked; Orthanc's report finds nobody listening and is lost.
    assert dispatcher.run_once().commitment_requested == 2
    first_txn = {i.commitment_transaction_uid for i in outbox(db)}
    assert len(first_txn) == 1 and {i.commitment_state for i in outbox(db)} == {"requested"}
    wait_report_lost(orthanc)
    time.sleep(1.1)  # past commitment_timeout_seconds

    late = dispatcher.run_once()
    assert late.failed == 2 and late.commitment_requested == 0
    for item in outbox(db):
        assert item.state == DeliveryState.PENDING and item.commitment_state == "failed"
        assert item.last_error == "no storage commitment report within 1 s"
        assert item.attempts == 1  # counted once, when it was sent

    scp = our_scp(config, dispatcher)
    try:
        wait(lambda: dispatcher.run_once().commitment_requested == 2)
        wait(lambda: all_done(db, 2))
    finally:
        scp.shutdown()
    items = outbox(db)
    assert {i.commitment_state for i in items} == {"committed"}
    assert {i.attempts for i in items} == {2}
    assert {i.commitment_transaction_uid for i in items}.isdisjoint(first_txn)
    db.dispose()


def test_negative_commitment_report_sends_that_object_again(
    tmp_path: Path, orthanc_factory
) -> None:
    orthanc = orthanc_factory()
    config, db, scp_port = commitment_setup(tmp_path, orthanc)
    dispatcher = Dispatcher(db, config)
    assert dispatcher.run_once().commitment_requested == 2
    items = {i.object_kind: i for i in outbox(db)}
    txn = items["sr"].commitment_transaction_uid
    wait_report_lost(orthanc)  # else Orthanc's own (positive) report could win the race
    scp = our_scp(config, dispatcher)
    try:
        # A PACS reporting on that transaction: SR committed, SEG not found.
        peer = AE(ae_title="ORTHANC")
        peer.add_requested_context(StorageCommitmentPushModel)
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        assoc = peer.associate("127.0.0.1", scp_port, ae_title="SECONDREADER", ext_neg=[role])
        assert assoc.is_established
        info = Dataset()
        info.TransactionUID = txn
        ok, failed = Dataset(), Dataset()
        ok.ReferencedSOPClassUID = items["sr"].sop_class_uid
        ok.ReferencedSOPInstanceUID = items["sr"].sop_instance_uid
        failed.ReferencedSOPClassUID = items["seg"].sop_class_uid
        failed.ReferencedSOPInstanceUID = items["seg"].sop_instance_uid
        failed.FailureReason = 0x0112
        info.ReferencedSOPSequence = [ok]
        info.FailedSOPSequence = [failed]
        status, _ = assoc.send_n_event_report(
            info, 2, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        assoc.release()
        assert status.Status == 0x0000

        after = {i.object_kind: i for i in outbox(db)}
        assert after["sr"].state == DeliveryState.DONE
        assert after["sr"].commitment_state == "committed"
        seg = after["seg"]
        assert seg.state == DeliveryState.PENDING and seg.commitment_state == "failed"
        assert seg.last_status == 0x0112 and seg.attempts == 1
        assert seg.last_error == "storage commitment failed: 0x0112 no such object instance"

        # After its backoff the SEG is sent and asked for again; Orthanc has it.
        wait(lambda: dispatcher.run_once().commitment_requested == 1)
        wait(lambda: all_done(db, 2))
    finally:
        scp.shutdown()
    seg = {i.object_kind: i for i in outbox(db)}["seg"]
    assert (seg.attempts, seg.commitment_state) == (2, "committed")
    assert seg.commitment_transaction_uid != txn
    db.dispose()


LOOP_LUA = """
-- Auto-routing as a PACS does it: every instance it stores goes on to the AI.
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'secondreader')
end
"""


def test_our_sr_routed_back_by_the_pacs_starts_no_loop(
    tmp_path: Path, daemon_factory, orthanc_factory
) -> None:
    """Orthanc forwards everything it stores to us, every kind of our objects included.

    The summary is a Secondary Capture, an image class: only the outbox
    tells it from an image to analyse.
    """
    lua = tmp_path / "forward.lua"
    lua.write_text(LOOP_LUA)
    orthanc = orthanc_factory(extra={"LuaScripts": [str(lua)]})
    daemon = daemon_factory(delivery_config(orthanc, outputs=CLASSIFIER_KINDS), env=NO_WORKER)
    knows_our_scp(orthanc, daemon)
    orthanc.start()
    daemon.start()
    files = rd.ct_study(tmp_path / "ct")
    send_to_daemon(daemon, files)
    db = open_db(daemon)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rd.record_analysis(db, daemon.state, study_uid, [rd.analysed(files)])
    daemon.wait_for(lambda: all_done(db, len(CLASSIFIER_KINDS)), timeout=60)
    ours = {i.sop_instance_uid for i in outbox(db)}

    # All come back from Orthanc: kept apart as our own objects, audited.
    def returned() -> list[AncillaryInstance]:
        with db.session() as s:
            rows = list(s.scalars(select(AncillaryInstance)))
        return rows if {r.sop_instance_uid for r in rows} == ours else []

    rows = daemon.wait_for(returned, timeout=60)
    assert {r.reason for r in rows} == {"own object"}
    assert {r.calling_ae for r in rows} == {orthanc.aet}
    # Nothing re-opened the study (that happens when an instance is recorded),
    # so there is one completion, one job, one analysis: no loop.
    with db.session() as s:
        (study,) = s.scalars(select(Study)).all()
        assert (study.state, study.completion_count) == ("complete", 1)
        assert len(s.scalars(select(Job)).all()) == 1
        reopened = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == EventType.STUDY_REOPENED)
        ).all()
        assert reopened == []
        ignored = s.scalars(
            select(AuditEvent).where(AuditEvent.event_type == EventType.INSTANCE_IGNORED)
        ).all()
        assert {e.sop_instance_uid for e in ignored} == ours
    assert len(runs(db)) == 1
    assert daemon.stop() == 0
    db.dispose()
