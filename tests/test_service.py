"""Process life of `secondreader serve`: SIGTERM, draining, systemd notify, limits."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from db.audit import EventType
from tests.conftest import DaemonProcess, dcmtk_env, require_tool, storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, dataset_bytes, header, spool_path


def _echoscu(port: int, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("echoscu"), "-aet", aet, "-aec", "SECONDREADER", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dcmtk_env(),
    )


@contextmanager
def _held_association(port: int, aet: str = "HOLDER") -> Iterator:
    """An association our test keeps open, to send on whenever it chooses."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are on disk
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="SECONDREADER")
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _wait_log(d: DaemonProcess, text: str, timeout: float = 30) -> None:
    d.wait_for(lambda: text in d.log(), timeout=timeout, interval=0.05)


def test_sigterm_when_idle(daemon_factory) -> None:
    d = daemon_factory(RECEIVE_ONLY).start()
    assert d.stop(timeout=30) == 0
    log = d.log()
    assert "received SIGTERM: stopping" in log
    assert log.rstrip().endswith("secondreader stopped")


def test_sigterm_during_an_association_lets_it_finish(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(RECEIVE_ONLY).start()
    files = ct_study(tmp_path / "ct", 80, size=512, seed=31)
    headers = [header(p) for p in files]
    folder = spool_path(d.state, headers[0]).parent
    sender = subprocess.Popen(
        [require_tool("storescu"), "-v", "-aec", "SECONDREADER", "127.0.0.1", str(d.port), *files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )
    d.wait_for(lambda: folder.exists() and len(list(folder.glob("*.dcm"))) >= 5, interval=0.01)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    at_signal = len(list(folder.glob("*.dcm")))
    out, _ = sender.communicate(timeout=120)
    assert at_signal < len(files), "the association had ended before SIGTERM"

    assert sender.returncode == 0, out
    assert out.count("Received Store Response (Success)") == len(files)
    assert d.proc.wait(timeout=60) == 0
    d.proc = None
    for path, h in zip(files, headers, strict=True):
        assert dataset_bytes(spool_path(d.state, h)) == dataset_bytes(path)
    db = DaemonDB.of(d.state)
    assert len(db.instances(headers[0].study_instance_uid)) == len(files)
    db.close()
    assert "secondreader stopped" in d.log()


def test_draining_rejects_new_associations(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(RECEIVE_ONLY).start()
    files = ct_study(tmp_path / "ct", 3, seed=32)
    with _held_association(d.port) as assoc:
        assert assoc.send_c_store(files[0]).Status == 0
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        _wait_log(d, "received SIGTERM: stopping")
        # Draining starts once the main loop wakes up: an echo may still get in before.
        late = d.wait_for(
            lambda: (r := _echoscu(d.port)).returncode != 0 and r, interval=0.05, timeout=30
        )
        assert "Association Rejected" in late.stderr
        assert "Rejected Transient" in late.stderr
        # The association that was running goes on as normal.
        assert assoc.send_c_store(files[1]).Status == 0
        assert assoc.send_c_store(files[2]).Status == 0
        assert d.proc.poll() is None
    assert d.proc.wait(timeout=30) == 0
    d.proc = None
    for path in files:
        assert spool_path(d.state, header(path)).exists()
    db = DaemonDB.of(d.state)
    rejected = db.events(EventType.ASSOCIATION_REJECTED)
    assert [(e.actor, e.detail["reason"]) for e in rejected] == [("ECHOSCU", "shutting down")]
    db.close()


def test_drain_has_a_time_limit(daemon_factory) -> None:
    d = daemon_factory(RECEIVE_ONLY, env={"SECONDREADER_SCP__DRAIN_SECONDS": "1"}).start()
    with _held_association(d.port):
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        # Well before the default drain (30 s) would end; the log says why.
        assert d.proc.wait(timeout=25) == 0
        d.proc = None
    assert "associations still running after 1 s; closing" in d.log()


def test_systemd_notify_ready_watchdog_stopping(daemon_factory, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(10)
        d = daemon_factory(
            RECEIVE_ONLY, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
        ).start()
        ready = sock.recv(4096).decode()
        assert ready.splitlines() == ["READY=1", f"STATUS=listening on port {d.port}"]
        # Pinged at half the watchdog interval: two within ~2 s.
        started = time.monotonic()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert time.monotonic() - started < 4
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        rest = []
        while b"STOPPING=1" not in rest:
            rest.append(sock.recv(4096))
        assert set(rest) <= {b"WATCHDOG=1", b"STOPPING=1"}
        assert d.proc.wait(timeout=30) == 0
        d.proc = None


def test_max_associations(daemon_factory) -> None:
    # Both held associations come from one address: its share (half of
    # max_associations by default) raised to the whole, to test the limit itself.
    d = daemon_factory(
        RECEIVE_ONLY,
        env={
            "SECONDREADER_SCP__MAX_ASSOCIATIONS": "2",
            "SECONDREADER_SCP__MAX_ASSOCIATIONS_PER_ADDRESS": "2",
        },
    ).start()
    with _held_association(d.port, "ONE"), _held_association(d.port, "TWO"):
        third = _echoscu(d.port)
        assert third.returncode != 0
        assert "Association Rejected" in third.stderr
        assert "Local Limit Exceeded" in third.stderr
    # Both released: room again.
    d.wait_for(lambda: _echoscu(d.port).returncode == 0, timeout=10)
    assert d.stop() == 0


def test_storescu_after_restart(daemon_factory, tmp_path: Path) -> None:
    """A stopped and restarted daemon keeps its data and serves on the same port."""
    d = daemon_factory(RECEIVE_ONLY).start()
    first, second = ct_study(tmp_path / "a", 2, seed=33), ct_study(tmp_path / "b", 2, seed=34)
    assert storescu(d.port, first).returncode == 0
    assert d.stop() == 0
    d.start()
    assert storescu(d.port, second).returncode == 0
    for path in first + second:
        assert spool_path(d.state, header(path)).exists()
    assert d.log().count("secondreader ready") == 2
    assert d.stop() == 0
