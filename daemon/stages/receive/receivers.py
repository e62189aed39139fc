"""Receive on every core: more receiving processes sharing the SCP's port.

With `scp.processes = N`, `serve` listens itself and starts N-1 receiving
processes that accept from its listening socket (passed to them, not bound
again): whichever process is least busy takes the next association
(dicom_io/guard.py, SharedSocketAssociationServer). Each process is the
receive stage in full (dicom_io/scp.py, daemon/receiver.py): the same
spool, fsync before the response, and the same database, so an
acknowledged instance is as durable as with one process. Only `serve` runs
the later stages, the scheduler and the start-up recovery.

A child that completes an MPPS wait writes one byte to a pipe; `serve`
reads it and wakes its completer, as its own receiver does. A child that
dies is started again; on SIGTERM the children drain like `serve`.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from daemon.config import Config
from dicom_io.guard import UNAVAILABLE, LoadBoard

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # no fork of a threaded process


def _wake(fd: int) -> None:
    """Wake the completer in `serve` (the parent reads the pipe)."""
    os.write(fd, b"c")


def run_receiving_process(
    config: Config,
    index: int,
    listening: socket.socket,
    counts: Any,
    wake_fd: int,
    parent: int,
) -> None:
    """A child's whole life: the receive stage alone, until SIGTERM or its parent is gone."""
    # Imported here: the child is spawned and imports only what receiving needs.
    from daemon.factories import open_database, scp_settings
    from daemon.liveness import Heartbeat
    from daemon.logs import setup_logging
    from daemon.stages.deliver import Dispatcher
    from daemon.stages.receive.receiver import Receiver
    from dicom_io.scp import StorageSCP
    from dicom_io.spool import Spool

    setup_logging(config.logging.level, config.logging.json_format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches serve, which stops us
    db = open_database(config)
    spool = Spool(config.storage.spool_dir, fsync=config.storage.fsync)
    ancillary = (
        Spool(config.storage.ancillary_dir, fsync=config.storage.fsync)
        if config.scp.non_image_objects == "store"
        else None
    )
    board = LoadBoard(counts, index)
    receiver = Receiver(
        db,
        spool,
        config.scp.max_associations,
        ancillary=ancillary,
        others_busy=board.others_busy,
        store_deadline=config.scp.store_deadline_seconds,
    )
    receiver.on_ready = lambda: _wake(wake_fd)
    dispatcher = Dispatcher(db, config)
    scp = StorageSCP(
        scp_settings(config, load_board=board, listening_socket=listening),
        receiver.on_store,
        receiver.on_association,
        on_commitment=dispatcher.on_commitment if dispatcher.wants_commitment else None,
        on_mpps=receiver.on_mpps if config.scp.accept_mpps else None,
        on_refused=receiver.on_refused,
    )
    scp.start()
    heartbeat = Heartbeat(db, "receiver", config.worker.liveness_seconds).start()
    gc.freeze()  # start-up's objects: out of every garbage collection (daemon/worker.py)
    board.set(0)  # listening: the others may leave connections to us now
    log.info("receiving process %d (pid %d) listening on port %d", index, os.getpid(), scp.port)
    while not stop.wait(1.0):
        if os.getppid() != parent:  # serve is gone: do not hold the port alone
            break
    scp.drain(config.scp.drain_seconds)
    scp.shutdown()
    heartbeat.stop()
    receiver.close()
    db.dispose()


class ReceiverPool:
    """The N-1 receiving processes beside `serve`'s own SCP."""

    def __init__(self, config: Config, wake: Callable[[], None]) -> None:
        self.config = config
        self.count = config.scp.processes - 1
        self._wake = wake
        self._read_fd, self._write_fd = os.pipe()
        self._procs: list[BaseProcess | None] = [None] * self.count
        self._stopping = False
        self._listening: socket.socket | None = None
        # Open connections of `serve` (slot 0) and of each child (dicom_io/guard.py).
        self._counts = _SPAWN.RawArray("q", config.scp.processes)
        for index in range(1, config.scp.processes):
            self._counts[index] = UNAVAILABLE  # until that child listens

    def board(self) -> LoadBoard:
        """`serve`'s own slot, for its SCP."""
        return LoadBoard(self._counts, 0)

    def start(self, listening: socket.socket) -> None:
        """Start the children on `serve`'s listening socket (it stays open in `serve`)."""
        self._listening = listening
        for index in range(self.count):
            self._spawn(index)
        threading.Thread(target=self._wake_loop, name="receiver-wake", daemon=True).start()

    def _spawn(self, index: int) -> None:
        proc = _SPAWN.Process(
            target=run_receiving_process,
            # The socket travels as a file descriptor (multiprocessing's reduction).
            args=(
                self.config,
                index + 1,
                self._listening,
                self._counts,
                self._write_fd,
                os.getpid(),
            ),
            name=f"secondreader-receive-{index + 1}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc

    def _wake_loop(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            self._wake()

    def check(self) -> bool:
        """Start again a child that died; True when all run."""
        healthy = True
        for index, proc in enumerate(self._procs):
            if self._stopping or (proc is not None and proc.is_alive()):
                continue
            healthy = False
            code = proc.exitcode if proc is not None else None
            self._counts[index + 1] = UNAVAILABLE  # leave it no connection until it listens
            log.warning("receiving process %d exited (%s); starting it again", index + 1, code)
            self._spawn(index)
        return healthy

    def request_stop(self) -> None:
        """SIGTERM to every child: each drains its associations, as `serve` does meanwhile."""
        self._stopping = True
        for proc in self._procs:
            if proc is not None and proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    def join(self, timeout: float) -> None:
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(timeout)
            if proc.is_alive():
                log.warning("receiving process %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join(5)
        os.close(self._write_fd)
