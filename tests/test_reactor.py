"""The accepted associations' reactors wait for work (dicom_io/reactor.py), and the
accept loop never stops them for a full garbage collection (dicom_io/guard.py)."""

from __future__ import annotations

import gc
import hashlib
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_io import reactor
from dicom_io.scp import ReceivedObject, SCPSettings, StorageSCP
from dicom_io.synthetic import write_ct_series

# The pynetdicom 3.0.4 loops that dicom_io/reactor.py copies with its waits in
# place of the sleeps. Another pynetdicom changes these digests: compare the
# new loops with the copies and bring the copies up to date before this passes.
ORIGINALS = {
    "DULServiceProvider.run_reactor": (
        DULServiceProvider.run_reactor,
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    ),
    "Association._run_reactor": (
        Association._run_reactor,
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    ),
    "Association.run_reactor": (
        Association.run_reactor,
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    ),
    "DIMSEServiceProvider.receive_primitive": (
        DIMSEServiceProvider.receive_primitive,
        "5f99c86b14a15cefa87d914cda3591ec4d636d4c53a982e945ec9c1828c6e43f",
    ),
}


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_the_copied_pynetdicom_loops_are_unchanged(name: str) -> None:
    function, digest = ORIGINALS[name]
    assert hashlib.sha256(inspect.getsource(function).encode()).hexdigest() == digest, name


@pytest.fixture
def scp() -> Iterator[tuple[StorageSCP, list[ReceivedObject]]]:
    received: list[ReceivedObject] = []

    def on_store(obj: ReceivedObject) -> int:
        received.append(obj)
        return 0x0000

    server = StorageSCP(SCPSettings("SECONDREADER", "127.0.0.1", 0), on_store)
    server.start()
    yield server, received
    server.shutdown()


def _associate(port: int) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SECONDREADER")
    assert assoc.is_established
    return assoc


def _counting(
    monkeypatch: pytest.MonkeyPatch,
    cls: type,
    name: str,
    which: Callable[[Any], bool] = lambda _: True,
) -> Callable[[], int]:
    """Count calls of cls.name (from any thread) on the instances `which` picks."""
    original = getattr(cls, name)
    calls = [0]
    lock = threading.Lock()

    def counted(self: object, *args: object, **kwargs: object) -> object:
        if which(self):
            with lock:
                calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return lambda: calls[0]


def test_an_idle_association_waits_instead_of_polling(
    scp: tuple[StorageSCP, list[ReceivedObject]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's loops turn 1,000 times a second each; ours once per IDLE_WAIT at most."""
    server, _ = scp
    dul_turns = _counting(monkeypatch, reactor.ReactiveDUL, "_wait_for_work")
    # The association's loop looks for a decoded message on every turn (the
    # test's own requestor, in this process, keeps pynetdicom's loop).
    assoc_turns = _counting(
        monkeypatch,
        DIMSEServiceProvider,
        "get_msg",
        lambda dimse: isinstance(dimse.assoc, reactor.ReactiveAssociation),
    )
    assoc = _associate(server.port)
    try:
        idle = 1.0
        before = dul_turns(), assoc_turns()
        time.sleep(idle)
        turns = dul_turns() - before[0], assoc_turns() - before[1]
        # Woken only by their own timeouts: idle / IDLE_WAIT turns (20) each,
        # never more; pynetdicom's loops would have turned about 1,000 times.
        assert max(turns) <= idle / reactor.IDLE_WAIT + 2, turns
        # And it still answers at once when asked.
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_requests_on_a_waiting_association_are_served_and_released(
    scp: tuple[StorageSCP, list[ReceivedObject]], tmp_path: Path
) -> None:
    server, received = scp
    files = write_ct_series(np.zeros((5, 32, 32), dtype=np.int16), tmp_path)
    assoc = _associate(server.port)
    uids = []
    for path in files:
        uids.append(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert assoc.send_c_store(path).Status == 0x0000
        time.sleep(0.12)  # longer than IDLE_WAIT: each request finds the loops waiting
    assoc.release()
    assert assoc.is_released
    assert [o.sop_instance_uid for o in received] == uids
    deadline = time.monotonic() + 10
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.active_associations == 0


def test_associations_leave_no_descriptor_behind(
    scp: tuple[StorageSCP, list[ReceivedObject]],
) -> None:
    """Each DUL thread's eventfd is closed when the association ends, released or aborted."""
    server, _ = scp

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def settled() -> None:
        deadline = time.monotonic() + 10
        while (
            server.active_associations
            or any(isinstance(t, DULServiceProvider) for t in threading.enumerate())
        ) and time.monotonic() < deadline:
            time.sleep(0.02)

    _associate(server.port).release()
    settled()
    before = open_fds()
    for index in range(10):
        assoc = _associate(server.port)
        if index % 2:
            assoc.abort()
        else:
            assoc.release()
    settled()
    assert open_fds() == before


def test_the_accept_loop_runs_no_full_garbage_collection(
    scp: tuple[StorageSCP, list[ReceivedObject]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's accept loop calls gc.collect() every 60th turn: a stall of every association.

    Each accepted association is at least one turn of the loop, so 65 of them
    pass pynetdicom's 60th turn whatever the idle turns in between.
    """
    server, _ = scp
    collections: list[str] = []
    full_collect = gc.collect

    def counted(*args: Any, **kwargs: Any) -> int:
        collections.append(threading.current_thread().name)
        return full_collect(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", counted)
    for _ in range(65):
        assoc = _associate(server.port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert server.is_alive()
    assert collections == []


def test_start_up_objects_are_frozen_out_of_collections() -> None:
    """serve's warm-up freezes what start-up made, so the collector's full passes stay short."""
    from daemon.service import _warm_up

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        _warm_up()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
