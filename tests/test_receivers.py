"""Receive on every core: `scp.processes = 2`, two receiving processes on one port.

Which process the kernel hands a connection to is its choice (SO_REUSEPORT
hashes the peer's address and port), so the test asserts what must hold
whichever way it goes: every instance of four concurrent associations lands
byte for byte, each study completes once, a killed receiving process is
started again, and a clean stop ends them all. bench/ingest.py measures the
throughput.
"""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import storescu
from tests.dicomgen import RECEIVE_ONLY, DaemonDB, ct_study, dataset_bytes, header, spool_path


def child_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"receiving process 1 \(pid (\d+)\) listening", log)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose: reaped by its parent's join.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_two_receiving_processes_share_the_port(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(RECEIVE_ONLY)
    # [scp] is the DaemonProcess's own section: processes goes in through the environment.
    d.env["SECONDREADER_SCP__PROCESSES"] = "2"
    d.start()
    (first,) = d.wait_for(lambda: child_pids(d.log()), timeout=60)
    db = DaemonDB.of(d.state)

    studies = [ct_study(tmp_path / f"s{k}", 10, seed=60 + k) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: storescu(d.port, files), studies))
    assert [r.returncode for r in results] == [0, 0, 0, 0]
    uids = [header(files[0]).study_instance_uid for files in studies]
    d.wait_for(lambda: db.complete(*uids), timeout=60)
    for files in studies:
        for path in files:
            assert dataset_bytes(spool_path(d.state, header(path))) == dataset_bytes(path)
    for uid in uids:
        assert db.study(uid).completion_count == 1

    # A receiving process that dies is started again, and receiving goes on.
    os.kill(first, signal.SIGKILL)
    pids = d.wait_for(lambda: len(child_pids(d.log())) == 2 and child_pids(d.log()), timeout=60)
    assert "receiving process 1 exited" in d.log() and pids[1] != first
    more = ct_study(tmp_path / "more", 5, seed=70)
    assert storescu(d.port, more).returncode == 0
    d.wait_for(lambda: db.complete(header(more[0]).study_instance_uid), timeout=60)

    assert d.stop() == 0
    assert not alive(pids[1])
    db.close()
