"""Hostile peers against a real daemon: stalls, drips, lies about lengths, forged titles.

Each attack reproduces one the issue tracker recorded against pynetdicom's
defaults (issue "Real hospital traffic and hostile peers"). After each one a
real dcmtk peer must still be served at once, and the trail must say what
happened. The attackers use other loopback addresses (127.0.0.x) than the
honest peer, as separate hosts would.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.audit import EventType
from db.models import AuditEvent
from dicom_io.scp import SCPSettings, StorageSCP
from tests.attacks import (
    associate_rq,
    closed_by_peer,
    connect,
    established,
    rss_kib,
    sockets,
    with_raw_calling_ae,
)
from tests.conftest import DaemonProcess, dcmtk_env, require_tool
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, daemon_db

TIMEOUT = 2  # scp.request_timeout_seconds and scp.pdu_timeout_seconds here
# Junk connections (never an association) are reported once per address and
# interval, then summarised with a count: a short interval here.
SETTINGS = (
    f"request_timeout_seconds = {TIMEOUT}\npdu_timeout_seconds = {TIMEOUT}\n"
    "junk_log_interval_seconds = 1\n"
)
# How long a test waits for something the daemon must do within TIMEOUT: the
# margin covers a loaded CI machine; nothing asserts how fast it happened.
GRACE = TIMEOUT + 15


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("hostile"), RECEIVE_ONLY)
    d.config_path.write_text(d.config_path.read_text().replace("[scp]\n", f"[scp]\n{SETTINGS}"))
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


@pytest.fixture(scope="module")
def hostile_db(hostile: DaemonProcess) -> Iterator[DaemonDB]:
    yield from daemon_db(hostile.state)


def echo(port: int, aec: str = "SECONDREADER") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("echoscu"), "-aet", "HONEST", "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dcmtk_env(),
    )


def _mark(db: DaemonDB) -> int:
    events = db.events()
    return events[-1].id if events else 0


def _events_after(db: DaemonDB, event_type: str, mark: int) -> list[AuditEvent]:
    return [e for e in db.events(event_type) if e.id > mark]


def count(events: list[AuditEvent]) -> int:
    """Connections the events stand for: a summary row counts several."""
    return sum(int(e.detail.get("count", 1)) for e in events)


def _wait_events(
    d: DaemonProcess, db: DaemonDB, event_type: str, mark: int, n: int, *texts: str
) -> list[AuditEvent]:
    def found() -> list[AuditEvent] | None:
        hits = [
            e
            for e in _events_after(db, event_type, mark)
            if any(text in e.detail["reason"] for text in texts)
        ]
        return hits if count(hits) >= n else None

    return d.wait_for(found, timeout=GRACE)  # type: ignore[no-any-return]


def _assert_served(d: DaemonProcess) -> None:
    r = echo(d.port)
    assert r.returncode == 0, r.stderr
    assert d.proc is not None and d.proc.poll() is None


def test_stalled_half_requests_do_not_lock_others_out(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    """10 peers send 40 bytes of an A-ASSOCIATE-RQ each and stall (was: everyone refused)."""
    mark = _mark(hostile_db)
    with sockets(10) as held:
        for i in range(10):
            s = connect(hostile.port, f"127.0.0.{10 + i}")
            s.sendall(associate_rq()[:40])
            held.append(s)
        # More than scp.max_associations (10) stalled peers, and an honest one is in at once.
        _assert_served(hostile)
        # Each stalled peer is cut at its deadline, logged and audited: the
        # request's deadline, or the PDU's (both 2 s here), whichever comes first.
        assert [s.getsockname() for s in held if not closed_by_peer(s, GRACE)] == []
    cut = _wait_events(
        hostile,
        hostile_db,
        EventType.ASSOCIATION_ABORTED,
        mark,
        10,
        "no association admitted within 2 s",
        "PDU not received whole within 2 s",
    )
    assert sorted(e.detail["address"] for e in cut) == [f"127.0.0.{10 + i}" for i in range(10)]


def test_one_address_cannot_take_every_pending_slot(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    mark = _mark(hostile_db)
    with sockets(24) as held:
        for _ in range(24):
            held.append(connect(hostile.port, "127.0.0.30"))
        _assert_served(hostile)
        assert [s.getsockname() for s in held if not closed_by_peer(s, GRACE)] == []

    # scp.max_pending_per_address = 16 (the default): refused at the accept
    # while 16 wait, each of those cut at its deadline. Every connection is
    # accounted for.
    def accounted() -> list[AuditEvent] | None:
        events = [
            e
            for e in _events_after(hostile_db, EventType.ASSOCIATION_REJECTED, mark)
            + _events_after(hostile_db, EventType.ASSOCIATION_ABORTED, mark)
            if e.detail["address"] == "127.0.0.30"
        ]
        return events if count(events) == 24 else None

    events = hostile.wait_for(accounted, timeout=GRACE)
    cap = "16 connections from this address await association already"
    refused = [e for e in events if e.detail["reason"].startswith(cap)]
    assert refused and count(refused) <= 8
    assert all(e in refused or "no association admitted" in e.detail["reason"] for e in events)
    assert {e.actor for e in events} == {"(unidentified)"}
    # Reported once per address and interval: the first of each kind at once,
    # the rest as one summary with its count.
    assert len(events) < 24


def test_a_burst_of_connections_from_one_pacs_is_served(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    """A PACS opens its associations in one burst: 10 still negotiating, one more is served.

    (The per-address cap used to be 4: a fifth association opened at the same
    moment as four others was refused.)
    """
    mark = _mark(hostile_db)
    with sockets(10) as held:
        for _ in range(10):
            held.append(connect(hostile.port, "127.0.0.1"))
        _assert_served(hostile)
        # Left silent, each is cut at its deadline; wait for that so that
        # the next test's trail starts clean.
        assert [s.getsockname() for s in held if not closed_by_peer(s, GRACE)] == []
    _wait_events(hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 10, "no association")


def test_malformed_requests_closed_at_once_leave_room(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    """10 malformed requests, each closed at once, used to shut receiving for 30 s."""
    mark = _mark(hostile_db)
    garbage = struct.pack(">BBL", 0x01, 0, 244) + bytes(range(244))
    for i in range(10):
        with connect(hostile.port, f"127.0.0.{40 + i}") as s:
            s.sendall(garbage)
    for _ in range(3):
        _assert_served(hostile)
    aborted = _wait_events(
        hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 10, "malformed or incomplete"
    )
    assert sorted(e.detail["address"] for e in aborted) == [f"127.0.0.{40 + i}" for i in range(10)]


def test_slow_drip_request_is_cut(hostile: DaemonProcess, hostile_db: DaemonDB) -> None:
    """One byte every 0.2 s: a valid request would take 40 s; the deadline is 2 s."""
    mark = _mark(hostile_db)
    request = associate_rq()
    with connect(hostile.port, "127.0.0.50") as s:
        sent = 0
        try:
            for byte in request:
                s.sendall(bytes([byte]))
                sent += 1
                if closed_by_peer(s, 0.2):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < len(request)
    _wait_events(hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 1, "no association")
    _assert_served(hostile)


def test_pdu_stalled_after_association_is_cut(hostile: DaemonProcess, hostile_db: DaemonDB) -> None:
    mark = _mark(hostile_db)
    with established(hostile.port, "127.0.0.51") as s:
        # A P-DATA-TF that announces 100 bytes and delivers 10.
        s.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"\x00" * 10)
        assert closed_by_peer(s, GRACE)
    cut = _wait_events(
        hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 1, "PDU not received whole"
    )
    assert cut[0].actor == "ATTACKER"
    _assert_served(hostile)


def test_declared_pdu_length_is_capped_before_identification(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    """Four peers declaring 2 GiB PDUs took the RSS from 124 MB to 2.7 GB."""
    assert hostile.proc is not None
    before = rss_kib(hostile.proc.pid)
    mark = _mark(hostile_db)
    chunk = b"\x00" * (1 << 20)
    for i in range(4):
        with connect(hostile.port, f"127.0.0.{60 + i}") as s:
            s.sendall(struct.pack(">BBL", 0x01, 0, 0x7FFFFFFF))
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(64):  # 64 MiB of the 2 GiB: the peer closes long before
                    s.sendall(chunk)
    cut = _wait_events(
        hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 4, "declared PDU length"
    )
    assert "2147483647 over the limit 262144 (unidentified peer)" in cut[0].detail["reason"]
    assert rss_kib(hostile.proc.pid) - before < 64 * 1024
    _assert_served(hostile)


def test_declared_pdu_length_is_capped_after_association(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    mark = _mark(hostile_db)
    limit = 1024 * 1024 + 1024  # scp.max_pdu_size (default) and headers
    with established(hostile.port, "127.0.0.64") as s:
        s.sendall(struct.pack(">BBL", 0x04, 0, limit + 1))
        assert closed_by_peer(s, GRACE)
    cut = _wait_events(
        hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 1, "declared PDU length"
    )
    assert f"{limit + 1} over the limit {limit} (admitted peer)" in cut[0].detail["reason"]
    _assert_served(hostile)


def test_called_ae_title_is_checked(hostile: DaemonProcess, hostile_db: DaemonDB) -> None:
    mark = _mark(hostile_db)
    r = echo(hostile.port, aec="SOMEONEELSE")
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stderr
    rejected = _wait_events(
        hostile, hostile_db, EventType.ASSOCIATION_REJECTED, mark, 1, "is not ours"
    )
    assert rejected[0].actor == "HONEST"
    assert rejected[0].detail["reason"] == "called AE title [SOMEONEELSE] is not ours"


def test_control_characters_in_a_calling_ae_title_are_escaped(
    hostile: DaemonProcess, hostile_db: DaemonDB
) -> None:
    """pynetdicom refuses the title and logs it, with its newline, in its error message."""
    mark = _mark(hostile_db)
    forged = b"EVIL\nFORGED INFO"
    with connect(hostile.port, "127.0.0.70") as s:
        s.sendall(with_raw_calling_ae(associate_rq(), forged))
        s.settimeout(GRACE)
        assert s.recv(1)[0] == 0x07  # A-ABORT: the request does not decode
    _wait_events(hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 1, "malformed")
    log = hostile.log()
    assert "Invalid '<value>' value '<value>'" in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    # Nor does any other line: every one starts with a time stamp.
    assert all(line[:4].isdigit() for line in log.splitlines())


def test_a_peer_abort_is_audited(hostile: DaemonProcess, hostile_db: DaemonDB) -> None:
    mark = _mark(hostile_db)
    with established(hostile.port, "127.0.0.71") as s:
        s.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))  # A-ABORT, service user
        assert closed_by_peer(s, GRACE)
    aborted = _wait_events(hostile, hostile_db, EventType.ASSOCIATION_ABORTED, mark, 1, "A-ABORT")
    assert aborted[0].actor == "ATTACKER"
    assert aborted[0].detail["address"] == "127.0.0.71"


def test_liveness_says_no_when_the_accept_loop_stops(tmp_path: Path) -> None:
    """The systemd watchdog is pinged only while the SCP's accept loop turns."""
    scp = StorageSCP(
        SCPSettings("SECONDREADER", "127.0.0.1", 0, liveness_seconds=1.0), lambda _obj: 0
    )
    scp.start()
    release = threading.Event()
    try:
        assert scp.is_alive()
        server = scp._server
        assert server is not None
        accept = server.get_request

        def stuck() -> tuple[socket.socket, object]:
            release.wait(30)
            return accept()

        server.get_request = stuck  # type: ignore[method-assign]
        with socket.create_connection(("127.0.0.1", scp.port)):
            deadline = time.monotonic() + 20
            while scp.is_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not scp.is_alive()
            server.get_request = accept  # type: ignore[method-assign]
            release.set()
            deadline = time.monotonic() + 20
            while not scp.is_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert scp.is_alive()
    finally:
        release.set()
        scp.shutdown()
