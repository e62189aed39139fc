"""Hostile and broken datasets: reused UIDs, hostile nesting, flipped VRs.

Each is sent to a real daemon; each must get its proper status, one audit
row and one log line, and must leave what was already accepted untouched.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from db.audit import EventType
from db.models import AuditEvent
from dicom_io.identify import STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH
from tests.conftest import DaemonProcess, storescu
from tests.dicomgen import (
    RECEIVE_ONLY,
    DaemonDB,
    ct_study,
    dataset_bytes,
    header,
    raw_send,
    spool_path,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("data"), RECEIVE_ONLY)
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


@pytest.fixture(scope="module")
def db(daemon: DaemonProcess) -> Iterator[DaemonDB]:
    database = DaemonDB.of(daemon.state)
    yield database
    database.close()


def _failed_after(db: DaemonDB, mark: int) -> list[AuditEvent]:
    return [e for e in db.events(EventType.INSTANCE_FAILED) if e.id > mark]


def _mark(db: DaemonDB) -> int:
    events = db.events()
    return events[-1].id if events else 0


def _with_sop_instance_uid(src: Path, dst: Path, uid: str, **attrs: str) -> Path:
    ds = dcmread(src)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_reused_sop_instance_uid_from_another_patient_is_refused(
    daemon: DaemonProcess, db: DaemonDB, tmp_path: Path
) -> None:
    a = ct_study(tmp_path / "a", 3, size=64, seed=1)
    assert storescu(daemon.port, a).returncode == 0
    ha = header(a[0])
    b_src = ct_study(tmp_path / "b", 1, size=64, seed=2)[0]
    b = _with_sop_instance_uid(
        b_src, tmp_path / "b-reuse.dcm", ha.sop_instance_uid, PatientID="OTHER-PATIENT"
    )
    hb = header(b)
    mark = _mark(db)

    assert raw_send(daemon.port, [b]) == [STATUS_DATASET_MISMATCH]

    # A's acknowledged instance is as it was: its row, its series, its file.
    rows = db.instances(ha.study_instance_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(header(p).sop_instance_uid for p in a)
    assert {s.series_instance_uid for s in db.series(ha.study_instance_uid)} == {
        ha.series_instance_uid
    }
    assert dataset_bytes(spool_path(daemon.state, ha)) == dataset_bytes(a[0])
    # B left nothing behind: no study, no file.
    assert db.study(hb.study_instance_uid) is None
    assert not spool_path(daemon.state, hb).exists()
    failed = _failed_after(db, mark)
    assert len(failed) == 1
    assert failed[0].sop_instance_uid == ha.sop_instance_uid
    assert failed[0].study_instance_uid == hb.study_instance_uid
    assert failed[0].detail["recorded_study_instance_uid"] == ha.study_instance_uid
    assert "already recorded in another series" in failed[0].detail["reason"]


def test_reused_series_instance_uid_in_another_study_is_refused(
    daemon: DaemonProcess, db: DaemonDB, tmp_path: Path
) -> None:
    a = ct_study(tmp_path / "a", 2, size=64, seed=3)
    assert storescu(daemon.port, a).returncode == 0
    ha = header(a[0])
    other = ct_study(tmp_path / "c", 1, size=64, seed=4, series_uid=ha.series_instance_uid)
    hc = header(other[0])
    assert hc.study_instance_uid != ha.study_instance_uid
    mark = _mark(db)

    assert raw_send(daemon.port, other) == [STATUS_DATASET_MISMATCH]
    assert db.study(hc.study_instance_uid) is None
    assert len(db.instances(ha.study_instance_uid)) == 2
    failed = _failed_after(db, mark)
    assert [e.detail["recorded_study_instance_uid"] for e in failed] == [ha.study_instance_uid]
    assert "Series Instance UID already recorded in another study" in failed[0].detail["reason"]


# -- unparseable datasets ------------------------------------------------------------


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


def _header_elements(uids: dict[str, str], vr_of: dict[str, bytes] | None = None) -> bytes:
    vr_of = vr_of or {}
    order = [
        ("SOPClassUID", 0x0008, 0x0016, b"UI"),
        ("SOPInstanceUID", 0x0008, 0x0018, b"UI"),
        ("Modality", 0x0008, 0x0060, b"CS"),
        ("SeriesDescription", 0x0008, 0x103E, b"LO"),
        ("StudyInstanceUID", 0x0020, 0x000D, b"UI"),
        ("SeriesInstanceUID", 0x0020, 0x000E, b"UI"),
    ]
    return b"".join(
        _element(g, e, vr_of.get(keyword, vr), uids[keyword].encode())
        for keyword, g, e, vr in order
    )


def _nested_sequence(depth: int) -> bytes:
    """(0040,A730) nested `depth` levels deep, undefined lengths all the way."""
    sq = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00" + struct.pack("<L", 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (sq + item) * depth + (item_end + seq_end) * depth


def _part10(dataset: bytes, uids: dict[str, str], path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uids["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = uids["SOPInstanceUID"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    stub = Dataset()
    stub.file_meta = meta
    stub.save_as(path, enforce_file_format=True)  # preamble and meta, empty dataset
    path.write_bytes(path.read_bytes() + dataset)
    return path


def _uids() -> dict[str, str]:
    return {
        "SOPClassUID": CTImageStorage,
        "SOPInstanceUID": generate_uid(),
        "Modality": "CT",
        "SeriesDescription": "Hostile",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("nested-500", "nested deeper than 32 levels"),
        ("vr-in-identifying-tag", "unknown VR at (0008,0018)"),
        ("vr-elsewhere", "unknown VR at (0008,103E)"),
    ],
)
def test_unparseable_datasets_get_cannot_understand(
    daemon: DaemonProcess, db: DaemonDB, tmp_path: Path, case: str, reason: str
) -> None:
    """Were 0xA700 (senders retry), 3,000 traceback lines, no audit row, or a broken report."""
    uids = _uids()
    if case == "nested-500":
        data = _header_elements(uids) + _nested_sequence(500)
    elif case == "vr-in-identifying-tag":
        data = _header_elements(uids, {"SOPInstanceUID": b"QQ"})
    else:
        data = _header_elements(uids, {"SeriesDescription": b"QQ"})
    path = _part10(data, uids, tmp_path / f"{case}.dcm")
    mark = _mark(db)
    log_before = len(daemon.log().splitlines())

    assert raw_send(daemon.port, [path]) == [STATUS_CANNOT_UNDERSTAND]

    failed = _failed_after(db, mark)
    assert [(e.sop_instance_uid, e.detail["status"]) for e in failed] == [
        (uids["SOPInstanceUID"], STATUS_CANNOT_UNDERSTAND)
    ]
    assert reason in failed[0].detail["reason"]
    assert db.study(uids["StudyInstanceUID"]) is None
    new_lines = daemon.log().splitlines()[log_before:]
    refused = [line for line in new_lines if "refused SOP instance" in line]
    assert len(refused) == 1 and reason in refused[0]
    assert not any("Traceback" in line for line in new_lines)
    # The association went on: a good instance is still stored.
    good = ct_study(tmp_path / "good", 1, size=64)
    assert storescu(daemon.port, good).returncode == 0
    assert spool_path(daemon.state, header(good[0])).exists()
