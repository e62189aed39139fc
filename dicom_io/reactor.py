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

Three more changes, each against a peer that misbehaves:
- the association thread waits for the A-ASSOCIATE-RQ only while the
  connection is open: pynetdicom waits the whole ACSE timeout (30 s) after
  a peer connected and left, and 100 such connections held 100 threads and
  locked out every peer;
- a command set that cannot be decoded aborts the association with one log
  line (pynetdicom raised in the DUL thread: a traceback on stderr and a
  connection closed with no A-ABORT);
- a C-STORE-RQ whose UIDs are empty, too long or not UIDs is answered with
  a failure status instead of being dropped without an answer or aborted
  (`ScreenedDIMSE`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.utils import make_target

from dicom_io import status
from dicom_io.identify import valid_uid
from dicom_io.text import printable

log = logging.getLogger(__name__)

# Seconds an idle loop waits at most before it looks at its timers again.
IDLE_WAIT = 0.05


@dataclass(frozen=True)
class RefusedStore:
    """A C-STORE-RQ answered with a failure status before any handler saw it."""

    sop_class_uid: str  # as sent, escaped: may be empty or not a UID
    sop_instance_uid: str
    reason: str


# The SCP's say on a refused C-STORE-RQ: the status to answer; it also audits.
RefuseStore = Callable[[Association, RefusedStore], int]


class _WakingQueue(queue.Queue[Any]):
    """A queue whose put from another thread than the DUL's wakes the DUL."""

    def __init__(self, dul: ReactiveDUL, old: queue.Queue[Any]) -> None:
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
                self._send_abort()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            if event == "Evt17" and self.state_machine.current_state == "Sta1":
                # Closed again after the close was handled (the DUL reports a
                # short read, then the socket its close): no connection is
                # left to serve, and pynetdicom would raise InvalidEventError.
                self._kill_thread = True
                return
            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                # pynetdicom raised out of its state machine (it has logged
                # already): abort, never let the exception kill this thread.
                self._abort_on(exc)
                return
            self._activity()
            sleep = False

    def _abort_on(self, exc: BaseException) -> None:
        """Send an A-ABORT (service provider), report once, stop the association."""
        conn = getattr(self.socket, "guard_conn", None)
        guard = getattr(self.socket, "guard", None)
        why = f"protocol error ({printable(type(exc).__name__)})"
        if guard is not None and conn is not None:
            guard.cut(conn, why, shutdown=False)
        else:
            log.warning("association aborted: %s", why)
        self._send_abort()

    def _send_abort(self) -> None:
        """A-ABORT from the service provider (pynetdicom's own error path), then stop."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        with contextlib.suppress(Exception):  # the connection may be gone already
            assert self.socket is not None
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class ReactiveAssociation(Association):
    """pynetdicom's acceptor Association, its 1 ms reactor sleep replaced by a wait."""

    activity: threading.Event
    # Set by the guard's reaper (any thread): release the association at the
    # reactor's next turn, saying why. An A-RELEASE-RQ from the acceptor is
    # allowed (PS3.8 7.2); a peer that does not answer is aborted after
    # `release_timeout`.
    release_reason: str | None
    release_timeout: float
    # A request is being served (a handler runs): not idle, whatever the clock says.
    serving: bool

    def kill(self) -> None:
        self.activity.set()
        super().kill()

    def _wait_for_request(self) -> A_ASSOCIATE | None:
        """The A-ASSOCIATE-RQ; None once the connection is gone or after the ACSE timeout.

        pynetdicom blocks on its queue for the whole ACSE timeout, whatever
        became of the connection. The DUL sets `activity` after each event,
        the connection's close included.
        """
        deadline = time.monotonic() + (self.acse_timeout or 30)
        while time.monotonic() < deadline:
            primitive = self.dul.receive_pdu(wait=False)
            if primitive is not None:
                # Anything but a request (an A-P-ABORT indication) ends it too.
                return primitive if isinstance(primitive, A_ASSOCIATE) else None
            if self._kill or self._connection_gone():
                # Nothing more can come; one last look for what came with the close.
                primitive = self.dul.receive_pdu(wait=False)
                return primitive if isinstance(primitive, A_ASSOCIATE) else None
            self.activity.wait(IDLE_WAIT)
            self.activity.clear()
        return None

    def _connection_gone(self) -> bool:
        """No A-ASSOCIATE-RQ can come any more: closed, or aborted and closing.

        Sta1 alone is not enough: it is also the state before the DUL has
        seen its connection open (PS3.8 table 9-10).
        """
        if not self.dul.is_alive():
            return True
        state = self.dul.state_machine.current_state
        sock = self.dul.socket
        closed = sock is None or not sock._is_connected
        return state == "Sta13" or (state == "Sta1" and closed)

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's Association.run_reactor for an acceptor; see `_wait_for_request`."""
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()

        primitive = self._wait_for_request()
        if primitive is None:
            self.kill()
            sock = self.dul.socket
            if self._server and sock is not None and sock.socket:
                self._server.shutdown_request(sock.socket)
            return

        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            self._run_reactor()
        sock = self.dul.socket
        if self._server and sock is not None and sock.socket:
            self._server.shutdown_request(sock.socket)

    def _still_idle(self) -> bool:
        """The guard's last word before the release (it may have woken up since)."""
        sock = self.dul.socket
        conn, guard = getattr(self, "guard_conn", None), getattr(sock, "guard", None)
        if self.dimse.message is not None:
            return False  # a message half received
        return guard is None or conn is None or bool(guard.keep(conn))

    def _release_for(self, reason: str) -> None:
        """Release (or, unanswered, abort) the association from the reactor thread."""
        ASSOC_LOGGER.info("Releasing Association: %s", reason)
        self.acse_timeout = self.release_timeout
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self.release()  # pynetdicom aborts when no A-RELEASE-RP comes in time
        self._is_paused = False
        self.kill()

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
                self.serving = True
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    self.serving = False
                self.activity.set()  # another message may be queued already
            elif self.release_reason is not None and self.is_established:
                if self._still_idle():
                    self._release_for(self.release_reason)
                    return
                self.release_reason = None  # the peer woke up meanwhile

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


class ScreenedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, answering the requests it would drop or abort on.

    `receive_primitive` is pynetdicom 3.0.4's, with two changes:
    - a command set that cannot be decoded (random bytes, no Command Field)
      aborts the association as an unrecognised PDU does (Evt19: A-ABORT,
      then the connection closes), reported once by the guard;
    - a C-STORE-RQ that pynetdicom cannot turn into a primitive (a UID over
      64 characters: it aborted) or that is not a valid request (an empty
      UID: it dropped the message, and the sender waited for its own
      timeout) is answered with the status `refuse_store` returns.
    """

    refuse_store: RefuseStore | None
    # Requests refused on this association: past `_MAX_REFUSED`, it is aborted.
    refused: int

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
        try:
            complete = self.message.decode_msg(primitive, self.assoc)
        except Exception as exc:
            self.message = None
            self._protocol_error(f"undecodable DIMSE command set ({type(exc).__name__})")
            return
        if not complete:
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})
        message, self.message = self.message, None
        conn = getattr(self.assoc, "guard_conn", None)
        if conn is not None:
            conn.messages += 1  # a whole DIMSE message: not an idle association
        context_id = cast(int, message.context_id)
        try:
            d_primitive = message.message_to_primitive()
        except Exception as exc:
            d_primitive = None
            why = f"invalid command set ({type(exc).__name__})"
        else:
            why = "invalid command set"
        finally:
            # Issue #41 of pynetdicom: drop the buffers with the message.
            message.encoded_command_set = BytesIO()
            message.data_set = BytesIO()
        command = message.command_set
        if command.get("CommandField") == _C_STORE_RQ and (
            d_primitive is None or not _valid_store(cast(C_STORE, d_primitive))
        ):
            self._refuse_store(command, context_id, why)
            return
        if d_primitive is None:
            self._protocol_error(why)
            return
        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            msg_id = cast(int, d_primitive.MessageIDBeingRespondedTo)
            self.cancel_req[msg_id] = d_primitive
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            t = threading.Thread(
                target=make_target(self.assoc._serve_request),
                args=(d_primitive, context_id),
            )
            t.start()
        else:
            self.msg_queue.put((context_id, d_primitive))  # type: ignore[arg-type]

    def _protocol_error(self, why: str) -> None:
        """Abort as for an unrecognised PDU (PS3.8 AA-8), the reason reported once."""
        sock = self.dul.socket
        conn, guard = getattr(sock, "guard_conn", None), getattr(sock, "guard", None)
        if guard is not None and conn is not None:
            guard.cut(conn, why, shutdown=False)  # the guard closes it if the peer does not
        else:
            log.warning("association aborted: %s", why)
        self.dul.event_queue.put("Evt19")

    def _refuse_store(self, command: Dataset, context_id: int, why: str) -> None:
        self.refused += 1
        if self.refused > _MAX_REFUSED:
            # A sender of nothing but broken requests: each costs an audit row.
            self._protocol_error(f"more than {_MAX_REFUSED} invalid C-STORE requests")
            return
        message_id = command.get("MessageID")
        if not isinstance(message_id, int):
            self._protocol_error("C-STORE-RQ without a Message ID")
            return
        sop_class = _raw_text(command, "AffectedSOPClassUID")
        sop_instance = _raw_text(command, "AffectedSOPInstanceUID")
        if not valid_uid(sop_instance):
            why = "Affected SOP Instance UID of the request is empty or not a valid UID"
        elif not valid_uid(sop_class):
            why = "Affected SOP Class UID of the request is empty or not a valid UID"
        refused = RefusedStore(sop_class, sop_instance, why)
        code = status.DATASET_MISMATCH
        if self.refuse_store is not None:
            code = self.refuse_store(self.assoc, refused)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        if valid_uid(sop_class):
            rsp.AffectedSOPClassUID = sop_class
        if valid_uid(sop_instance):
            rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = code
        self.send_msg(rsp, context_id)


_C_STORE_RQ = 0x0001  # Command Field (PS3.7 E.1)
# Invalid C-STORE requests answered on one association before it is aborted.
_MAX_REFUSED = 10


def _raw_text(command: Dataset, keyword: str) -> str:
    """A command element's value as sent, escaped and cut: it may be anything."""
    try:
        value = command.get(keyword)
    except Exception:
        return ""
    return printable(str(value or "").strip("\x00 "), limit=80)


def _valid_store(primitive: C_STORE) -> bool:
    return bool(
        primitive.is_valid_request
        and valid_uid(str(primitive.AffectedSOPInstanceUID or ""))
        and valid_uid(str(primitive.AffectedSOPClassUID or ""))
    )


def adopt(
    assoc: Association, refuse_store: RefuseStore | None = None, release_timeout: float = 5.0
) -> None:
    """Give a new acceptor association (its threads not started) the waiting reactors."""
    assoc.__class__ = ReactiveAssociation
    reactive = cast(ReactiveAssociation, assoc)
    reactive.activity = threading.Event()
    reactive.release_reason = None
    reactive.release_timeout = release_timeout
    reactive.serving = False
    # Thread.__init__ bound the original run_reactor as the target.
    setattr(reactive, "_target", make_target(reactive.run_reactor))  # noqa: B010 (private)
    dul = assoc.dul
    dul.__class__ = ReactiveDUL
    cast(ReactiveDUL, dul)._adopt()
    dimse = assoc.dimse
    dimse.__class__ = ScreenedDIMSE
    screened = cast(ScreenedDIMSE, dimse)
    screened.refuse_store = refuse_store
    screened.refused = 0
