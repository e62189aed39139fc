"""`secondreader echo | send | status` against real peers: dcmtk's storescp and our daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, free_port
from tests.dicomgen import (
    NON_IMAGE,
    RECEIVE_ONLY,
    DaemonDB,
    by_sop_instance,
    ct_study,
    dataset_bytes,
    header,
    not_dicom,
    sample_file,
    spool_path,
    storescp,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("cli"), RECEIVE_ONLY)
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


def _cli(d: DaemonProcess, *args: str) -> tuple[int, str, str]:
    r = d.cli(*args, check=False)
    return r.returncode, r.stdout, r.stderr


def test_echo_dcmtk_storescp(daemon: DaemonProcess, tmp_path: Path) -> None:
    with storescp(tmp_path / "in", aet="DCMTK") as port:
        rc, out, err = _cli(daemon, "echo", "--port", str(port), "--aet", "DCMTK")
    assert rc == 0, err
    assert "C-ECHO status 0x0000" in out


def test_echo_our_daemon_and_nobody(daemon: DaemonProcess) -> None:
    rc, out, _ = _cli(daemon, "echo", "--port", str(daemon.port), "--aet", "SECONDREADER")
    assert rc == 0 and "C-ECHO status 0x0000" in out
    rc, _, err = _cli(daemon, "echo", "--port", str(free_port()), "--aet", "SECONDREADER")
    assert rc == 1
    assert "echo failed" in err


def test_send_to_dcmtk_storescp_streams_files_unchanged(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "study"
    ct = ct_study(folder / "ct", 3, seed=11)
    compressed = [sample_file("693_J2KR.dcm"), sample_file("MR_small_RLE.dcm")]
    with storescp(tmp_path / "in", aet="DCMTK") as port:
        # A folder (walked recursively) and single files, in one association.
        rc, out, err = _cli(
            daemon,
            "send",
            "--port",
            str(port),
            "--aet",
            "DCMTK",
            str(folder),
            *map(str, compressed),
        )
    assert rc == 0, out + err
    assert "sent 5 of 5 file(s)" in out
    received = by_sop_instance(tmp_path / "in")
    for path in [*ct, *compressed]:
        h = header(path)
        # Streamed from disk as is: the dataset storescp wrote is the file's own,
        # group lengths, padding and compressed syntax included.
        assert dataset_bytes(received[h.sop_instance_uid]) == dataset_bytes(path), path.name


def test_send_reports_what_it_could_not_send(daemon: DaemonProcess, tmp_path: Path) -> None:
    text = not_dicom(tmp_path / "readme.dcm")
    good = ct_study(tmp_path / "ct", 2, seed=12)
    with storescp(tmp_path / "in", aet="DCMTK") as port:
        rc, out, err = _cli(
            daemon, "send", "--port", str(port), "--aet", "DCMTK", str(text), *map(str, good)
        )
    assert rc == 1
    assert f"failed: {text}" in err
    assert "sent 2 of 3 file(s)" in out
    assert len(by_sop_instance(tmp_path / "in")) == 2

    rc, _, err = _cli(daemon, "send", "--port", str(free_port()), "--aet", "X", *map(str, good))
    assert rc == 1 and "send failed" in err


def test_send_to_our_daemon_then_status(daemon: DaemonProcess, tmp_path: Path) -> None:
    files = ct_study(tmp_path / "ct", 4, seed=13)
    sr = sample_file(NON_IMAGE)
    h = header(files[0])
    rc, out, err = _cli(
        daemon,
        "send",
        "--port",
        str(daemon.port),
        "--aet",
        "SECONDREADER",
        "--calling-aet",
        "CLI-TEST",
        str(tmp_path / "ct"),
        str(sr),
    )
    # The SR goes too (every storage class is accepted), and is kept apart.
    assert rc == 0, err
    assert "sent 5 of 5 file(s)" in out
    for path in files:
        stored = spool_path(daemon.state, header(path))
        assert dataset_bytes(stored) == dataset_bytes(path)
    hs = header(sr)
    assert (
        daemon.state / "ancillary" / hs.study_instance_uid / hs.series_instance_uid
    ).is_dir()

    db = DaemonDB.of(daemon.state)
    try:
        daemon.wait_for(lambda: db.complete(h.study_instance_uid), timeout=30)
        assert {i.calling_ae for i in db.instances(h.study_instance_uid)} == {"CLI-TEST"}
    finally:
        db.close()

    rc, out, _ = _cli(daemon, "status", "--json")
    assert rc == 0
    status = json.loads(out)
    # Every state is counted, zero included (a dashboard shows 0, not "no data").
    assert status["studies"] == {"complete": 1, "receiving": 0}
    assert status["jobs"] == {"queued": 1, "running": 0, "done": 0, "failed": 0,
                              "not_applicable": 0}  # fmt: skip
    rc, out, _ = _cli(daemon, "status")
    assert rc == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "complete 1" in lines and "queued 1" in lines and "queue depth: 1" in lines


def test_usage_errors_exit_2(daemon: DaemonProcess) -> None:
    assert _cli(daemon)[0] == 2
    assert _cli(daemon, "frobnicate")[0] == 2
    rc, _, err = _cli(daemon, "echo", "--port", "not-a-port")
    assert rc == 2 and "--port" in err
