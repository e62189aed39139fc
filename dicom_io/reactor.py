"""Reactors that wait for work instead of polling, for the associations we accept.

pynetdicom runs two loops per association: the DUL thread sleeps 1 ms
between looks at its socket and queues, and the association thread sleeps
1 ms between looks for a decoded DIMSE message. Each idle association thus
wakes 2,000 times a second (four of them took 17 % of a core here), and
every C-STORE waits up to a millisecond at each hand-off between the two.
On a receiver whose throughput over one association is one object per
round trip, and whose concurrent associations compete for two cores, both
costs count (bench/ingest.py).

Here the same loops, copied from pynetdicom 3.0.4 (pinned <3.1 in
pyproject; tests/test_reactor.py fails if the originals change), wait
instead of sleeping:
- the DUL thread in `poll` on its socket and an eventfd, which is written
  when another thread queues a primitive for it or stops it;
- the association thread on an Event, set by the DUL thread after each
  event it processes (a decoded message, a release or abort request) and
  when it ends.

Both waits are bounded (`IDLE_WAIT`), so that the timers they used to check
every millisecond (ARTIM, the network idle timeout) still fire, late by at
most that much. Only acceptor associations of our SCP use them
(`adopt`, called by dicom_io/guard.py); our SCU keeps pynetdicom's own.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

# Seconds an idle loop waits at most before it looks at its timers again.
IDLE_WAIT = 0.05


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue whose put from another thread than the DUL's wakes the DUL."""

    def __init__(self, dul: ReactiveDUL, old: queue.Queue) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._dul = dul
        self.queue.extend(old.queue)

    def _put(self, item: Any) -> None:
        super()._put(item)
        if threading.get_ident() != self._dul.ident:
            self._dul.wake()


class ReactiveDUL(DULServiceProvider):
    """pynetdicom's DUL service provider, its idle sleep replaced by a wait."""

    _wake_fd: int
    _wake_lock: threading.Lock

    def _adopt(self) -> None:
        self._wake_fd = -1  # made by the DUL thread itself, closed when it ends
        self._wake_lock = threading.Lock()
        # What is queued already (the socket's Evt5: connection open) moves over.
        self.to_provider_queue = _WakingQueue(self, self.to_provider_queue)
        self.event_queue = _WakingQueue(self, self.event_queue)
        # Thread.__init__ bound the original loop as the target.
        self._target = make_target(self.run_reactor)

    def wake(self) -> None:
        """Cut the DUL thread's idle wait short (any thread)."""
        with self._wake_lock:
            if self._wake_fd >= 0:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self.wake()  # it would otherwise notice only at the end of its wait
        return super().stop_dul()

    def _wait_for_work(self, poller: select.poll) -> None:
        """Return when the socket is readable, a primitive is queued, or after IDLE_WAIT."""
        if self.to_provider_queue.qsize() or self.event_queue.qsize() or self._kill_thread:
            return
        transport = self.socket
        sock = transport.socket if transport is not None and transport._is_connected else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes buffered: poll would not see them
        fd = sock.fileno() if sock is not None else -1  # -1 once closed
        if fd >= 0:
            poller.register(fd, select.POLLIN)
        try:
            events = poller.poll(IDLE_WAIT * 1000)
        finally:
            if fd >= 0:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    poller.unregister(fd)
        if any(ready_fd == self._wake_fd for ready_fd, _ in events):
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(self._wake_fd)

    def _activity(self) -> None:
        woken = getattr(self.assoc, "activity", None)
        if woken is not None:
            woken.set()

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's DULServiceProvider.run_reactor; the sleep is `_wait_for_work`."""
        with self._wake_lock:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        try:
            self._reactor_loop(poller)
        finally:
            with self._wake_lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
            self._activity()  # the association sees the DUL gone at once

    def _reactor_loop(self, poller: select.poll) -> None:
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work(poller)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                assert self.socket is not None
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            self._activity()
            sleep = False


class ReactiveAssociation(Association):
    """pynetdicom's acceptor Association, its 1 ms reactor sleep replaced by a wait."""

    activity: threading.Event

    def kill(self) -> None:
        self.activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's Association._run_reactor; the sleep is a wait on `activity`."""
        self._is_paused = False
        while not self._kill:
            self.activity.wait(IDLE_WAIT)
            # Cleared before looking: what the DUL sets from here on ends the next wait.
            self.activity.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self.activity.set()  # another message may be queued already

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def adopt(assoc: Association) -> None:
    """Give a new acceptor association (its threads not started) the waiting reactors."""
    assoc.__class__ = ReactiveAssociation
    reactive = cast(ReactiveAssociation, assoc)
    reactive.activity = threading.Event()
    dul = assoc.dul
    dul.__class__ = ReactiveDUL
    cast(ReactiveDUL, dul)._adopt()
