"""Scheduled pull against a real PACS: each new study once, across polls and a restart.

Orthanc holds the studies (sent by dcmtk's storescu, as a modality would);
the daemon polls it every second with C-FIND and pulls with C-MOVE. Each
pulled image is received exactly once (its receive count stays 1), and the
filters keep out an MR study and a CT older than the age window.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from db import audit
from db.audit import EventType
from db.models import PulledStudy
from tests.conftest import DaemonProcess, storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, header
from tests.orthanc import Orthanc


def pull_config(orthanc: Orthanc) -> str:
    return f"""{RECEIVE_ONLY}
[pull]
enabled = true
ae_title = "{orthanc.aet}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
interval_seconds = 1
modalities = ["CT"]
max_age_days = 2
"""


def to_pacs(orthanc: Orthanc, files: list[Path]) -> str:
    sent = storescu(orthanc.dicom_port, files, aec=orthanc.aet)
    assert sent.returncode == 0, sent.stderr
    return header(files[0]).study_instance_uid


def polls(db: DaemonDB) -> int:
    with db.db.session() as s:
        return len(audit.events(s, EventType.PULL_POLLED))


def pulled(db: DaemonDB) -> dict[str, tuple[str, int]]:
    with db.db.session() as s:
        return {p.study_instance_uid: (p.state, p.attempts) for p in s.scalars(select(PulledStudy))}


def received_once(db: DaemonDB, study_uid: str, files: list[Path]) -> bool:
    rows = db.instances(study_uid)
    return {r.sop_instance_uid for r in rows} == {header(p).sop_instance_uid for p in files}


def test_each_new_study_is_pulled_once_across_polls_and_a_restart(
    daemon_factory, orthanc_factory, tmp_path: Path
) -> None:
    orthanc = orthanc_factory()
    d: DaemonProcess = daemon_factory()
    d.config_path.write_text(d.config_path.read_text() + pull_config(orthanc))
    orthanc.config["DicomModalities"] = {
        "secondreader": {"AET": "SECONDREADER", "Host": "127.0.0.1", "Port": d.port}
    }
    orthanc.start()
    first = ct_study(tmp_path / "first", 5, seed=41)
    second = ct_study(tmp_path / "second", 6, seed=42)
    mr = ct_study(tmp_path / "mr", 3, seed=43)
    old = ct_study(tmp_path / "old", 3, seed=44)
    for path in mr:  # not a CT: the modality filter keeps it out
        ds = dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    for path in old:  # older than the age window
        ds = dcmread(path)
        ds.StudyDate = "20200101"
        ds.save_as(path)
    uids = {name: to_pacs(orthanc, files) for name, files in
            (("first", first), ("second", second), ("mr", mr), ("old", old))}  # fmt: skip
    d.start()
    db = DaemonDB.of(d.state)
    d.wait_for(lambda: received_once(db, uids["first"], first), timeout=60)
    d.wait_for(lambda: received_once(db, uids["second"], second), timeout=60)

    # A third study reaches the PACS later: the next poll pulls it, only it.
    third = ct_study(tmp_path / "third", 4, seed=45)
    uids["third"] = to_pacs(orthanc, third)
    d.wait_for(lambda: received_once(db, uids["third"], third), timeout=60)
    # Two more polls after that pull nothing again.
    seen = polls(db)
    d.wait_for(lambda: polls(db) >= seen + 2, timeout=60)

    # A restart remembers what was pulled.
    assert d.stop() == 0
    d.start()
    seen = polls(db)
    d.wait_for(lambda: polls(db) >= seen + 2, timeout=60)
    assert d.stop() == 0

    assert pulled(db) == {
        uids["first"]: ("pulled", 1),
        uids["second"]: ("pulled", 1),
        uids["third"]: ("pulled", 1),
    }
    for name, files in (("first", first), ("second", second), ("third", third)):
        rows = db.instances(uids[name])
        assert len(rows) == len(files) and {r.receive_count for r in rows} == {1}, name
    assert db.study(uids["mr"]) is None and db.study(uids["old"]) is None
    with db.db.session() as s:
        moves = audit.events(s, EventType.PULL_MOVED)
    assert sorted(e.study_instance_uid for e in moves) == sorted(
        uids[n] for n in ("first", "second", "third")
    )
    db.close()
