"""Receive, end to end: dcmtk's storescu sends to a real `secondreader serve`.

What a modality sends must come out of the spool byte for byte, be recorded
in the database and the audit trail, and become one complete study with one
queued job; also across several associations, re-sends, late instances, a
SIGKILL in the middle of an association and concurrent associations.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from db.audit import EventType
from tests.conftest import DaemonProcess, dcmtk_env, require_tool, storescu
from tests.dicomgen import (
    RECEIVE_ONLY,
    DaemonDB,
    Header,
    by_sop_instance,
    ct_study,
    daemon_db,
    dataset_bytes,
    header,
    part_files,
    phi_in,
    phi_values,
    real_images,
    sample_file,
    send_by_transfer_syntax,
    spool_path,
    storescp,
)


@pytest.fixture(scope="module")
def rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the module; every test sends its own studies (fresh UIDs)."""
    d = DaemonProcess(tmp_path_factory.mktemp("rx"), RECEIVE_ONLY)
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


@pytest.fixture(scope="module")
def rx_db(rx: DaemonProcess) -> Iterator[DaemonDB]:
    yield from daemon_db(rx.state)


# Everything each test sent to `rx`, for the PHI check at the end of the module.
SENT: list[Header] = []


def _status(d: DaemonProcess) -> dict[str, dict[str, int]]:
    return json.loads(d.cli("status", "--json").stdout)  # type: ignore[no-any-return]


def _ok(runs: list[subprocess.CompletedProcess[str]]) -> None:
    for r in runs:
        assert r.returncode == 0, r.stderr


def _elements(path: Path) -> dict[int, object]:
    """Top-level elements by tag, without group lengths and trailing padding (FFFC,FFFC):
    a sender may drop or add those, as dcmtk does."""
    ds = dcmread(path)
    return {int(e.tag): e.value for e in ds if e.tag.element != 0x0000 and e.tag != 0xFFFCFFFC}


def test_ct_study_and_real_images_arrive_intact(
    rx: DaemonProcess, rx_db: DaemonDB, tmp_path: Path
) -> None:
    before = _status(rx)
    ct = ct_study(tmp_path / "ct", 30, size=512, seed=1)
    images = real_images()
    ct_headers = [header(p) for p in ct]
    image_headers = [header(p) for p in images]
    SENT.extend(ct_headers + image_headers)

    # The CT study in one association, the real images grouped by transfer
    # syntax (storescu proposes one syntax family per run). The same
    # transmissions go to dcmtk's storescp in bit-preserving mode: what it
    # wrote is what storescu put on the wire.
    _ok([storescu(rx.port, ct)])
    _ok(send_by_transfer_syntax(rx.port, images))
    with storescp(tmp_path / "reference") as ref_port:
        _ok(send_by_transfer_syntax(ref_port, images, aec="STORESCP"))
    reference = by_sop_instance(tmp_path / "reference")

    # Spool: one file per instance at Study/Series/SOP, dataset byte-identical.
    for path, h in zip(ct, ct_headers, strict=True):
        stored = spool_path(rx.state, h)
        assert dataset_bytes(stored) == dataset_bytes(path), path.name
    for path, h in zip(images, image_headers, strict=True):
        stored = spool_path(rx.state, h)
        assert dataset_bytes(stored) == dataset_bytes(reference[h.sop_instance_uid]), path.name
        # storescu re-encodes (drops group lengths, padding): the content is the source's.
        assert _elements(stored) == _elements(path), path.name
        meta = dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == h.sop_instance_uid
        assert meta.TransferSyntaxUID == h.transfer_syntax_uid
    assert part_files(rx.state) == []

    # Database: study, series and instance rows match what was sent.
    all_headers = ct_headers + image_headers
    studies = {h.study_instance_uid for h in all_headers}
    rx.wait_for(lambda: rx_db.complete(*studies), timeout=30)
    for study_uid in studies:
        sent = {h.sop_instance_uid: h for h in all_headers if h.study_instance_uid == study_uid}
        rows = {i.sop_instance_uid: i for i in rx_db.instances(study_uid)}
        assert rows.keys() == sent.keys()
        for uid, row in rows.items():
            h = sent[uid]
            assert row.sop_class_uid == h.sop_class_uid
            assert row.transfer_syntax_uid == h.transfer_syntax_uid
            assert row.path == f"{h.study_instance_uid}/{h.series_instance_uid}/{uid}.dcm"
            assert row.size_bytes == (rx.state / "spool" / row.path).stat().st_size
            assert row.receive_count == 1
            assert row.calling_ae == "STORESCU"
        assert {s.series_instance_uid for s in rx_db.series(study_uid)} == {
            h.series_instance_uid for h in sent.values()
        }
        study = rx_db.study(study_uid)
        assert study is not None and study.completion_count == 1
        jobs = rx_db.jobs(study_uid)
        assert [(j.kind, j.state) for j in jobs] == [("analyse", "queued")]
    ct_series = rx_db.series(ct_headers[0].study_instance_uid)
    assert [s.modality for s in ct_series] == ["CT"]

    # Audit: the associations, every instance, every completion and job.
    accepted = [e for e in rx_db.events(EventType.ASSOCIATION_ACCEPTED) if e.actor == "STORESCU"]
    assert accepted and all(e.detail["address"] == "127.0.0.1" for e in accepted)
    stored = {e.sop_instance_uid for e in rx_db.events(EventType.INSTANCE_STORED)}
    assert {h.sop_instance_uid for h in all_headers} <= stored
    completed = [
        e for e in rx_db.events(EventType.STUDY_COMPLETED) if e.study_instance_uid in studies
    ]
    assert sorted(e.study_instance_uid for e in completed) == sorted(studies)
    ct_event = next(
        e for e in completed if e.study_instance_uid == ct_headers[0].study_instance_uid
    )
    assert ct_event.detail["instances"] == 30
    queued = [e for e in rx_db.events(EventType.JOB_QUEUED) if e.study_instance_uid in studies]
    assert len(queued) == len(studies)

    # `secondreader status --json` counts them.
    after = _status(rx)
    assert after["studies"].get("complete", 0) - before["studies"].get("complete", 0) == len(
        studies
    )
    assert after["jobs"].get("queued", 0) - before["jobs"].get("queued", 0) == len(studies)
    assert after["studies"].get("receiving", 0) == 0


def test_study_over_two_associations_and_resent_instances(
    rx: DaemonProcess, rx_db: DaemonDB, tmp_path: Path
) -> None:
    files = ct_study(tmp_path / "ct", 20, seed=2)
    headers = [header(p) for p in files]
    SENT.extend(headers)
    study_uid = headers[0].study_instance_uid

    _ok([storescu(rx.port, files[:10])])
    _ok([storescu(rx.port, files[10:], aet="MODALITY2")])
    # A re-send is acknowledged as a success and changes nothing but the count.
    resent = storescu(rx.port, files[:3], extra=["-v"])
    assert resent.returncode == 0, resent.stderr
    assert resent.stderr.count("Received Store Response (Success)") == 3

    rx.wait_for(lambda: rx_db.complete(study_uid), timeout=30)
    rows = rx_db.instances(study_uid)
    assert len(rows) == 20
    counts = {r.sop_instance_uid: r.receive_count for r in rows}
    assert counts == {h.sop_instance_uid: (2 if i < 3 else 1) for i, h in enumerate(headers)}
    assert {r.calling_ae for r in rows} == {"STORESCU", "MODALITY2"}
    assert len(rx_db.series(study_uid)) == 1
    for path, h in zip(files, headers, strict=True):
        assert dataset_bytes(spool_path(rx.state, h)) == dataset_bytes(path)

    study = rx_db.study(study_uid)
    assert study is not None and study.completion_count == 1
    assert len(rx_db.jobs(study_uid)) == 1
    duplicates = [
        e.sop_instance_uid
        for e in rx_db.events(EventType.INSTANCE_STORED)
        if e.study_instance_uid == study_uid and e.detail["duplicate"]
    ]
    assert sorted(duplicates) == sorted(h.sop_instance_uid for h in headers[:3])


def test_instance_after_completion_reopens_the_study(
    rx: DaemonProcess, rx_db: DaemonDB, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    first = ct_study(tmp_path / "a", 5, seed=3, study_uid=study_uid, series_uid=series_uid)
    late = ct_study(tmp_path / "b", 1, seed=4, study_uid=study_uid, series_uid=generate_uid())
    SENT.extend(header(p) for p in first + late)

    _ok([storescu(rx.port, first)])
    rx.wait_for(lambda: rx_db.complete(study_uid), timeout=30)
    _ok([storescu(rx.port, late)])
    study = rx_db.study(study_uid)
    assert study is not None and study.state == "receiving"
    rx.wait_for(lambda: rx_db.complete(study_uid), timeout=30)

    study = rx_db.study(study_uid)
    assert study is not None and study.completion_count == 2
    assert len(rx_db.instances(study_uid)) == 6
    assert len(rx_db.series(study_uid)) == 2
    reopened = [
        e for e in rx_db.events(EventType.STUDY_REOPENED) if e.study_instance_uid == study_uid
    ]
    assert len(reopened) == 1
    completions = [
        e.detail["instances"]
        for e in rx_db.events(EventType.STUDY_COMPLETED)
        if e.study_instance_uid == study_uid
    ]
    assert completions == [5, 6]
    # The first job is still waiting: the re-completion needs no second one.
    assert [j.state for j in rx_db.jobs(study_uid)] == ["queued"]


def test_explicit_vr_is_preferred_over_implicit(rx: DaemonProcess, tmp_path: Path) -> None:
    """Implicit VR loses the VR of private elements: take Explicit when both are offered."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="PREFS")
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    # A compressed syntax offered with the uncompressed ones is kept as sent.
    ae.add_requested_context(
        CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless]
    )
    assoc = ae.associate("127.0.0.1", rx.port, ae_title="SECONDREADER")
    assert assoc.is_established
    try:
        chosen = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
    finally:
        assoc.release()
    assert chosen == [ExplicitVRLittleEndian, JPEG2000Lossless]


def test_log_holds_no_patient_names_or_ids(rx: DaemonProcess, tmp_path: Path) -> None:
    """Last in the module, so every study sent above went through this log; it also
    stands alone: it sends a generated study and a real image itself."""
    own = ct_study(tmp_path / "ct", 2, seed=9)
    _ok([storescu(rx.port, own), storescu(rx.port, [sample_file("MR_small.dcm")])])
    SENT.extend(header(p) for p in [*own, sample_file("MR_small.dcm")])
    log = rx.log()
    assert "association accepted from STORESCU@127.0.0.1" in log
    assert phi_in(log, phi_values(SENT)) == []


# -- a daemon of its own ---------------------------------------------------------------


def _spool_count(d: DaemonProcess, h: Header) -> int:
    folder = spool_path(d.state, h).parent
    return len(list(folder.glob("*.dcm"))) if folder.exists() else 0


def test_sigkill_mid_association_then_resend(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(RECEIVE_ONLY).start()
    db = DaemonDB.of(d.state)
    files = ct_study(tmp_path / "ct", 150, size=512, seed=5)
    headers = [header(p) for p in files]
    study_uid = headers[0].study_instance_uid

    sender = subprocess.Popen(
        [require_tool("storescu"), "-aec", "SECONDREADER", "127.0.0.1", str(d.port), *files],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dcmtk_env(),
    )
    d.wait_for(lambda: _spool_count(d, headers[0]) >= 20, timeout=60, interval=0.01)
    d.kill()
    at_kill = _spool_count(d, headers[0])
    assert sender.wait(timeout=60) != 0, "storescu should have lost its peer"
    assert at_kill < len(files), "the kill came after the association ended"

    d.start()  # sweeps unacknowledged temporaries
    assert part_files(d.state) == []
    assert "secondreader stopped" not in d.log()

    resend = storescu(d.port, files)
    assert resend.returncode == 0, resend.stderr
    d.wait_for(lambda: db.complete(study_uid), timeout=30)

    rows = db.instances(study_uid)
    assert len(rows) == len(files)
    assert {r.sop_instance_uid for r in rows} == {h.sop_instance_uid for h in headers}
    for path, h in zip(files, headers, strict=True):
        assert dataset_bytes(spool_path(d.state, h)) == dataset_bytes(path)
    spooled = sorted((d.state / "spool").rglob("*.dcm"))
    assert len(spooled) == len(files)
    assert part_files(d.state) == []
    status = json.loads(d.cli("status", "--json").stdout)
    assert {k: n for k, n in status["studies"].items() if n} == {"complete": 1}
    assert {k: n for k, n in status["jobs"].items() if n} == {"queued": 1}
    assert d.stop() == 0
    db.close()


def test_concurrent_associations_on_each_backend(
    daemon_factory, db_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Four storescu at once, one study in two series: one study row, no lost instance."""
    d = daemon_factory(f'{RECEIVE_ONLY}\n[database]\nurl = "{db_url}"\n').start()
    db = DaemonDB(db_url)
    study_uid = generate_uid()
    files = ct_study(tmp_path / "s1", 24, seed=6, study_uid=study_uid) + ct_study(
        tmp_path / "s2", 24, seed=7, study_uid=study_uid
    )
    headers = [header(p) for p in files]
    senders = [
        subprocess.Popen(
            [require_tool("storescu"), "-aet", f"MOD{k}", "-aec", "SECONDREADER"]
            + ["127.0.0.1", str(d.port), *files[k::4]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dcmtk_env(),
        )
        for k in range(4)
    ]
    for s in senders:
        _, err = s.communicate(timeout=60)
        assert s.returncode == 0, err.decode(errors="replace")
    d.wait_for(lambda: db.complete(study_uid), timeout=30)
    rows = db.instances(study_uid)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(h.sop_instance_uid for h in headers)
    assert len(db.series(study_uid)) == 2
    assert len(db.jobs(study_uid)) == 1
    for path, h in zip(files, headers, strict=True):
        assert dataset_bytes(spool_path(d.state, h)) == dataset_bytes(path)
    accepted = {e.actor for e in db.events(EventType.ASSOCIATION_ACCEPTED)}
    assert accepted == {"MOD0", "MOD1", "MOD2", "MOD3"}
    assert d.stop() == 0
    assert phi_in(d.log(), phi_values(headers)) == []
    db.close()
