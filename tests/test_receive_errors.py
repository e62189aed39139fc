"""Bad input to a real daemon: every refusal answered, audited, and harmless.

Each case sends something that must not be stored (a truncated file, a file
that is not DICOM, one without its SOP Instance UID, a non-image SOP class,
a caller not on the allow-list, a full disk), checks the status the sender
got, that nothing reached the spool and that an audit event says why, and
then that the daemon still stores a good instance.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from db.audit import EventType
from db.models import AuditEvent
from dicom_io.identify import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
)
from tests.conftest import DaemonProcess, storescu
from tests.dicomgen import (
    NON_IMAGE,
    RECEIVE_ONLY,
    DaemonDB,
    Header,
    ct_study,
    daemon_db,
    dataset_bytes,
    garbage_after_meta,
    header,
    not_dicom,
    part_files,
    phi_in,
    phi_values,
    raw_send,
    sample_file,
    spool_path,
    truncated_copy,
    without_sop_instance_uid,
)

ALLOW_LIST = """
[[scp.allowed_peers]]
ae_title = "STORESCU"

[[scp.allowed_peers]]
ae_title = "RAWSCU"

[[scp.allowed_peers]]
ae_title = "SECONDREADER"

[[scp.allowed_peers]]
ae_title = "REMOTE"
addresses = ["10.0.0.0/8"]

[[scp.allowed_peers]]
ae_title = "LOCAL"
addresses = ["10.0.0.0/8", "127.0.0.0/8"]
"""

SENT: list[Header] = []


@pytest.fixture(scope="module")
def err(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("err"), RECEIVE_ONLY + ALLOW_LIST)
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


@pytest.fixture(scope="module")
def err_db(err: DaemonProcess) -> Iterator[DaemonDB]:
    yield from daemon_db(err.state)


def _new_events(db: DaemonDB, event_type: str, after: int) -> list[AuditEvent]:
    return [e for e in db.events(event_type) if e.id > after]


def _last_event_id(db: DaemonDB) -> int:
    all_events = db.events()
    return all_events[-1].id if all_events else 0


def _assert_still_accepts(d: DaemonProcess, db: DaemonDB, tmp_path: Path) -> None:
    good = ct_study(tmp_path / f"good-{generate_uid()[-6:]}", 1, size=64)
    h = header(good[0])
    SENT.append(h)
    r = storescu(d.port, good)
    assert r.returncode == 0, r.stderr
    assert dataset_bytes(spool_path(d.state, h)) == dataset_bytes(good[0])
    assert [i.sop_instance_uid for i in db.instances(h.study_instance_uid)] == [h.sop_instance_uid]
    assert d.proc is not None and d.proc.poll() is None


def _assert_nothing_spooled(d: DaemonProcess, h: Header) -> None:
    assert not spool_path(d.state, h).exists()
    assert part_files(d.state) == []


def test_truncated_file(err: DaemonProcess, err_db: DaemonDB, tmp_path: Path) -> None:
    source = ct_study(tmp_path / "src", 1, size=256)[0]
    bad = truncated_copy(source, tmp_path / "truncated.dcm", cut_bytes=5000)
    h = header(source)
    mark = _last_event_id(err_db)

    # dcmtk reads the whole file before sending and refuses it locally...
    r = storescu(err.port, [bad])
    assert r.returncode != 0
    assert "larger" in r.stderr and "than remaining bytes" in r.stderr
    # ...so stream its raw bytes instead, as a broken sender would.
    assert raw_send(err.port, [bad]) == [STATUS_CANNOT_UNDERSTAND]

    _assert_nothing_spooled(err, h)
    assert err_db.instances(h.study_instance_uid) == []
    failed = _new_events(err_db, EventType.INSTANCE_FAILED, mark)
    assert [(e.actor, e.sop_instance_uid, e.detail["status"]) for e in failed] == [
        ("RAWSCU", h.sop_instance_uid, STATUS_CANNOT_UNDERSTAND)
    ]
    assert "truncated" in failed[0].detail["reason"]
    _assert_still_accepts(err, err_db, tmp_path)


def test_not_dicom(err: DaemonProcess, err_db: DaemonDB, tmp_path: Path) -> None:
    text = not_dicom(tmp_path / "notes.dcm")
    source = sample_file("CT_small.dcm")
    garbage = garbage_after_meta(source, tmp_path / "garbage.dcm")
    h = header(source)
    mark = _last_event_id(err_db)

    r = storescu(err.port, [text])
    assert r.returncode != 0 and "than remaining bytes in file" in r.stderr
    # `secondreader send` reports the file and sends the rest.
    good = ct_study(tmp_path / "good", 1, size=64)[0]
    SENT.append(header(good))
    sent = err.cli(
        "send", "--port", str(err.port), "--aet", "SECONDREADER", str(text), str(good), check=False
    )
    assert sent.returncode == 1
    assert f"failed: {text}" in sent.stderr
    assert "sent 1 of 2 file(s)" in sent.stdout
    assert spool_path(err.state, header(good)).exists()

    # A valid file meta followed by garbage gets past any local check.
    statuses = raw_send(err.port, [garbage])
    assert statuses[0] is not None and statuses[0] >= 0xA000
    _assert_nothing_spooled(err, h)
    failed = _new_events(err_db, EventType.INSTANCE_FAILED, mark)
    assert [(e.actor, e.sop_instance_uid, e.detail["status"]) for e in failed] == [
        ("RAWSCU", h.sop_instance_uid, statuses[0])
    ]
    _assert_still_accepts(err, err_db, tmp_path)


def test_missing_sop_instance_uid(err: DaemonProcess, err_db: DaemonDB, tmp_path: Path) -> None:
    source = ct_study(tmp_path / "src", 1, size=64)[0]
    bad = without_sop_instance_uid(source, tmp_path / "no-sop-uid.dcm")
    h = header(source)
    mark = _last_event_id(err_db)

    r = storescu(err.port, [bad])
    assert r.returncode != 0 and "No SOP Class or Instance UID in file" in r.stderr
    assert raw_send(err.port, [bad]) == [STATUS_DATASET_MISMATCH]

    _assert_nothing_spooled(err, h)
    assert err_db.study(h.study_instance_uid) is None
    failed = _new_events(err_db, EventType.INSTANCE_FAILED, mark)
    assert len(failed) == 1
    assert {k: v for k, v in failed[0].detail.items() if k != "association"} == {
        "status": STATUS_DATASET_MISMATCH,
        "reason": "sop_instance_uid missing",
    }
    assert failed[0].detail["association"]  # links it to its association's events
    _assert_still_accepts(err, err_db, tmp_path)


def test_non_image_object_is_kept_audited_and_never_analysed(
    err: DaemonProcess, err_db: DaemonDB, tmp_path: Path
) -> None:
    """A PACS that routes whole studies sends SR next to the images: kept, never analysed."""
    sr = sample_file(NON_IMAGE)
    h = header(sr)
    SENT.append(h)
    mark = _last_event_id(err_db)

    r = storescu(err.port, [sr], extra=["-R"])
    assert r.returncode == 0, r.stderr
    kept = err.state / "ancillary" / h.study_instance_uid / h.series_instance_uid
    # storescu re-encodes it as Explicit VR, which we prefer: same content, new bytes.
    assert dcmread(kept / f"{h.sop_instance_uid}.dcm") == dcmread(sr)
    # It is not an instance of a study: no study row, nothing to complete or analyse.
    assert err_db.study(h.study_instance_uid) is None
    _assert_nothing_spooled(err, h)
    ignored = _new_events(err_db, EventType.INSTANCE_IGNORED, mark)
    assert [(e.sop_instance_uid, e.detail["reason"], e.detail["stored"]) for e in ignored] == [
        (h.sop_instance_uid, "non-image", True)
    ]
    assert _new_events(err_db, EventType.INSTANCE_FAILED, mark) == []
    _assert_still_accepts(err, err_db, tmp_path)


@pytest.mark.parametrize("policy", ["refuse", "discard", "refused-class"])
def test_non_image_policies(daemon_factory, tmp_path: Path, policy: str) -> None:  # type: ignore[no-untyped-def]
    sr = sample_file(NON_IMAGE)
    h = header(sr)
    config = {
        "refuse": 'non_image_objects = "refuse"',
        "discard": 'non_image_objects = "discard"',
        "refused-class": f'refused_sop_classes = ["{h.sop_class_uid}"]',
    }[policy]
    d = daemon_factory(RECEIVE_ONLY)
    d.config_path.write_text(d.config_path.read_text().replace("[scp]\n", f"[scp]\n{config}\n"))
    d.start()
    db = DaemonDB.of(d.state)
    try:
        good = ct_study(tmp_path / "good", 1, size=64)[0]
        if policy == "discard":
            r = storescu(d.port, [sr], extra=["-R"])
            assert r.returncode == 0, r.stderr
            assert not (d.state / "ancillary").exists() or not any(
                (d.state / "ancillary").rglob("*.dcm")
            )
            ignored = db.events(EventType.INSTANCE_IGNORED)
            assert [(e.sop_instance_uid, e.detail["stored"]) for e in ignored] == [
                (h.sop_instance_uid, False)
            ]
        else:
            alone = storescu(d.port, [sr], extra=["-R"])
            assert alone.returncode != 0
            assert "No Acceptable Presentation Contexts" in alone.stderr
            # Next to an image: that context alone is rejected, the image goes through.
            mixed = storescu(d.port, [sr, good], extra=["-R", "--no-halt", "-v"])
            assert "No presentation context for: (SRt)" in mixed.stderr
            assert "Received Store Response (Success)" in mixed.stderr
            assert spool_path(d.state, header(good)).exists()
        assert db.study(h.study_instance_uid) is None
        _assert_nothing_spooled(d, h)
    finally:
        db.close()
        d.stop()


def test_caller_not_on_the_allow_list(err: DaemonProcess, err_db: DaemonDB, tmp_path: Path) -> None:
    files = ct_study(tmp_path / "ct", 2, size=64)
    h = header(files[0])
    SENT.append(h)
    mark = _last_event_id(err_db)

    stranger = storescu(err.port, files, aet="STRANGER")
    # Allowed title, but only from 10.0.0.0/8: we call from 127.0.0.1.
    remote = storescu(err.port, files, aet="REMOTE")
    for r in (stranger, remote):
        assert r.returncode != 0
        assert "Association Rejected" in r.stderr
        assert "Calling AE Title Not Recognized" in r.stderr
    _assert_nothing_spooled(err, h)
    # The rejection goes out first, its audit event is written right after.
    rejected = err.wait_for(
        lambda: (
            (e := _new_events(err_db, EventType.ASSOCIATION_REJECTED, mark)) and len(e) == 2 and e
        )
    )
    assert [(e.actor, e.detail["address"]) for e in rejected] == [
        ("STRANGER", "127.0.0.1"),
        ("REMOTE", "127.0.0.1"),
    ]
    assert all("not allowed" in e.detail["reason"] for e in rejected)
    assert _new_events(err_db, EventType.ASSOCIATION_ACCEPTED, mark) == []

    # The same title list with the loopback network allowed: accepted.
    local = storescu(err.port, files, aet="LOCAL")
    assert local.returncode == 0, local.stderr
    assert spool_path(err.state, h).exists()
    _assert_still_accepts(err, err_db, tmp_path)


def test_error_log_holds_no_patient_names_or_ids(
    err: DaemonProcess, err_db: DaemonDB, tmp_path: Path
) -> None:
    """Last in the module, so the refusals above were logged too; it also stands alone."""
    source = ct_study(tmp_path / "src", 1, size=64)[0]
    SENT.append(header(source))
    assert raw_send(err.port, [truncated_copy(source, tmp_path / "cut.dcm")]) == [
        STATUS_CANNOT_UNDERSTAND
    ]
    assert storescu(err.port, [source], aet="STRANGER").returncode != 0
    _assert_still_accepts(err, err_db, tmp_path)
    log = err.log()
    assert "from RAWSCU: dataset is truncated" in log
    assert "association from STRANGER@127.0.0.1 rejected" in log
    assert phi_in(log, phi_values([*SENT, header(sample_file("CT_small.dcm"))])) == []
    assert err.stop() == 0


# -- disk full -------------------------------------------------------------------------


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(
            "the disk-full test mounts a small tmpfs and needs root with CAP_SYS_ADMIN: "
            + r.stderr.strip()
        )


def test_disk_full(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real ENOSPC: the state folder is a 2 MiB tmpfs, the database lives elsewhere."""
    d = daemon_factory(f'{RECEIVE_ONLY}\n[database]\nurl = "sqlite:///{tmp_path / "db.sqlite"}"\n')
    _mount_tmpfs(d.state, "2m")
    try:
        d.start()
        db = DaemonDB(f"sqlite:///{tmp_path / 'db.sqlite'}")
        big = sample_file("RG1_UNCI.dcm")  # 7 MB
        h = header(big)

        r = storescu(d.port, [big], extra=["-v"])
        assert r.returncode != 0
        assert "Received Store Response (Refused: OutOfResources)" in r.stderr
        _assert_nothing_spooled(d, h)
        assert db.study(h.study_instance_uid) is None
        failed = db.events(EventType.INSTANCE_FAILED)
        assert [(e.sop_instance_uid, e.detail["status"], e.detail["reason"]) for e in failed] == [
            (h.sop_instance_uid, STATUS_OUT_OF_RESOURCES, "disk full")
        ]
        _assert_still_accepts(d, db, tmp_path)
        db.close()
        assert d.stop() == 0
        assert phi_in(d.log(), phi_values([h])) == []
    finally:
        d.kill()
        subprocess.run(["umount", str(d.state)], check=True)
