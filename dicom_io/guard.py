"""The association server, hardened against peers that stall, drip or lie.

pynetdicom 3.0.x (pinned in pyproject) leaves an accepted socket without any
timeout, performs the TLS handshake in its single accept thread, reads
whatever PDU length a peer declares, and counts every open connection against
`maximum_associations` before its request is even parsed. On a hospital
network any of these lets one anonymous host shut the receiver (shared notes,
"pynetdicom under hostile peers"). This module changes exactly those points:

* accept only in the accept thread; the TLS handshake runs in the
  connection's own thread, under the request deadline;
* a connection must have its association admitted within
  `request_timeout` of the accept, whatever it sends meanwhile (a reaper
  thread shuts the socket down past the deadline: half-sent requests, slow
  drips and stalled handshakes alike);
* every PDU must arrive whole within `pdu_timeout`, and a socket write
  blocked that long fails, so a peer that stops reading cannot hold a slot;
* the declared length of a PDU is capped: small before the association is
  admitted, our maximum PDU size after;
* connections not yet admitted are limited per source address and in all,
  and only admitted associations count against the association limit;
* new connections are limited per source address (a token bucket), and a
  refused one costs no thread: it is closed in the accept loop;
* an admitted association that sends nothing within `idle_association`
  is released, and one address or one calling AE title may hold only its
  share of the admitted associations;
* connections that never become an association (port scans, health checks,
  garbage) are logged and audited once per source address and interval,
  with a count (`JunkLedger`), and pynetdicom's own lines about them are
  folded into that one (`UnidentifiedPeerFilter`).

It relies on these pynetdicom internals: `AssociationServer.get_request`,
`ThreadingMixIn.process_request_thread`, `RequestHandler._create_association`
and `AssociationSocket.recv`, and on the DUL reading a PDU as recv(6) then
recv(length). A pynetdicom upgrade must re-check them (tests/test_hostile.py).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import logging
import re
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_io import reactor
from dicom_io.text import printable, scrub_values

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

_PDU_HEADER = 6  # type, reserved, 4-byte length: what the DUL reads first


@dataclass(frozen=True)
class GuardLimits:
    # From the TCP accept to the association admitted: TLS handshake included.
    request_timeout: float = 10.0
    # One PDU, from its first byte to its last; also the limit of one blocked write.
    pdu_timeout: float = 60.0
    # Declared PDU length before the association is admitted. An A-ASSOCIATE-RQ
    # with 128 presentation contexts of several syntaxes each is about 30 KB.
    max_request_pdu: int = 256 * 1024
    # After: what we announced as our maximum PDU (P-DATA PDVs), plus headers.
    max_pdu: int = 1024 * 1024
    max_pending_per_address: int = 16
    max_pending: int = 64
    # New connections per source address: a bucket of `connection_burst`
    # refilled at `connection_rate` per second; an admitted association gives
    # its token back (`admit`).
    connection_rate: float = 20.0
    connection_burst: int = 100
    # An admitted association that has sent no PDU this long is released.
    idle_association: float = 15.0
    # Admitted associations one address, or one calling AE title, may hold.
    max_associations_per_address: int = 5
    max_associations_per_calling_ae: int = 5
    # Junk connections are logged and audited once per address and interval.
    junk_interval: float = 60.0


@dataclass
class Connection:
    """One accepted TCP connection, from accept to close."""

    address: str
    port: int
    accepted_at: float
    # A second handle on the same socket: shutting it down wakes any thread
    # blocked on the connection, TLS-wrapped or not.
    control: socket.socket
    admitted: bool = False
    admitted_at: float = 0.0
    # Whether an allowed_peers rule ties its calling AE title to its address
    # (see `admit`: an impostor of that title does not take its share).
    bound: bool = False
    # After the association: a PDU's header read and its body not yet; when
    # the last whole PDU arrived; how many whole DIMSE messages
    # (reactor.ScreenedDIMSE). What tells an idle association from a busy one.
    in_pdu: bool = False
    last_pdu_at: float = 0.0
    messages: int = 0
    closed: bool = False
    assoc: Association | None = None
    # Set once the association's thread was started: before that, a thread
    # that is not alive has simply not begun.
    started: bool = False
    cut_reason: str | None = None
    cut_at: float = 0.0
    # Asked to release: idle (see `_idle`).
    idle_released: bool = False
    release_asked_at: float = 0.0
    # What pynetdicom said of a connection that never became an association.
    protocol_note: str = ""
    calling_ae: str = ""
    # Its association's outcome (accepted, rejected) was reported by the SCP.
    reported: bool = False
    # Names the association in the audit trail: its events and its instances'.
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @property
    def peer(self) -> str:
        who = f"{printable(self.calling_ae)}@" if self.calling_ae else ""
        return f"{who}{self.address}:{self.port}"


@dataclass(frozen=True)
class GuardEvent:
    """A connection the guard refused or cut, for the log and the audit trail."""

    kind: str  # "rejected" (refused at accept), "aborted" (cut later) or "released" (idle)
    address: str
    calling_ae: str
    reason: str
    association_id: str | None = None
    # How many connections this stands for (`JunkLedger` summaries).
    count: int = 1


class JunkLedger:
    """Connections that never became an association, reported once per address and interval.

    The first one from an address in an interval is reported at once, so a
    single event is seen as it happens; the others of that interval are
    counted, by address and reason, and reported as one summary each when
    the interval ends (`flush`). A scan of 1,000 connections thus writes a
    handful of lines and audit rows instead of 3,000. Thread-safe.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._seen: set[str] = set()
        # (kind, address, reason with its numbers blanked) -> [count, last event]
        self._counts: dict[tuple[str, str, str], list[Any]] = {}

    def first(self, event: GuardEvent) -> bool:
        """Count `event`; True if it is to be reported now (the address's first)."""
        with self._lock:
            # Many addresses at once (a botnet, an IPv6 prefix): a bounded
            # number of lines at once, the rest in the summaries.
            if event.address not in self._seen and len(self._seen) < _IMMEDIATE:
                self._seen.add(event.address)
                return True
            key = (event.kind, event.address, _DIGITS.sub("N", event.reason))
            entry = self._counts.setdefault(key, [0, event])
            entry[0] += 1
            entry[1] = event
            return False

    def flush(self, now: float, force: bool = False) -> list[GuardEvent]:
        """The summaries of the interval, if it has ended."""
        with self._lock:
            if not force and now - self._started < self.interval:
                return []
            counts, self._counts, self._seen = self._counts, {}, set()
            self._started = now
        return [
            GuardEvent(
                last.kind,
                last.address,
                "",
                f"{last.reason} ({n} more such connection{'s' * (n > 1)} from this "
                f"address in {self.interval:g} s)",
                None,
                n,
            )
            for n, last in counts.values()
        ]


_DIGITS = re.compile(r"\d+")
# Addresses whose first junk connection of an interval is reported at once.
_IMMEDIATE = 32


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


# A slot nobody should defer to: a receiving process not listening yet, or dead.
UNAVAILABLE = 1 << 40


class LoadBoard:
    """Open connections of each receiving process, in memory they all share.

    Processes that accept from one listening socket (daemon/receivers.py)
    would otherwise split a burst of associations by luck: whichever accept
    comes first takes several, and one core idles. Before accepting, a
    process that holds more connections than another waits a moment for the
    other to take the connection (`SharedSocketAssociationServer`).
    `counts` is a shared integer array (multiprocessing RawArray), one slot
    per process; a slot is only ever written by its own process, except
    `UNAVAILABLE`, written by the parent for a child that is not running.
    """

    def __init__(self, counts: Any, index: int) -> None:
        self.counts = counts
        self.index = index

    def set(self, open_connections: int) -> None:
        self.counts[self.index] = open_connections

    def others_busy(self) -> bool:
        """True while another listening process holds a connection."""
        return any(0 < n < UNAVAILABLE for i, n in enumerate(self.counts) if i != self.index)

    def others_less_busy(self) -> bool:
        mine = self.counts[self.index]
        return any(n < mine for i, n in enumerate(self.counts) if i != self.index)


class ConnectionGuard:
    """Book-keeping of open connections; thread-safe."""

    def __init__(
        self,
        limits: GuardLimits,
        max_associations: int,
        on_event: Callable[[GuardEvent], None],
        board: LoadBoard | None = None,
    ) -> None:
        self.limits = limits
        self.board = board
        self.max_associations = max_associations
        self._on_event = on_event
        self._lock = threading.Lock()
        self._conns: dict[int, Connection] = {}
        self._buckets: dict[str, _Bucket] = {}
        self.junk = JunkLedger(limits.junk_interval)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="scp-reaper", daemon=True)
        # Connections closed since memory was last handed back (`_trim`).
        self._closed_since_trim = 0

    def start(self) -> None:
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        for event in self.junk.flush(time.monotonic(), force=True):
            self._report(event)

    def _take_token(self, host: str, now: float) -> bool:
        """One new connection from `host` within its rate; called under the lock."""
        limits = self.limits
        bucket = self._buckets.get(host)
        if bucket is None:
            bucket = self._buckets[host] = _Bucket(float(limits.connection_burst), now)
        bucket.tokens = min(
            float(limits.connection_burst),
            bucket.tokens + (now - bucket.at) * limits.connection_rate,
        )
        bucket.at = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    # -- accounting --------------------------------------------------------
    def register(self, sock: socket.socket, address: tuple[Any, ...]) -> Connection | None:
        """A new TCP connection; None (and an event) if its address has too many pending."""
        host, port = str(address[0]), int(address[1])
        now = time.monotonic()
        victim: Connection | None = None
        with self._lock:
            # Cut ones are on their way out: they hold no place.
            pending = [c for c in self._conns.values() if not c.admitted and c.cut_reason is None]
            from_host = sum(c.address == host for c in pending)
            if not self._take_token(host, now):
                why = (
                    f"more than {self.limits.connection_rate:g} new connections a second "
                    "from this address (scp.connection_rate_per_address)"
                )
            elif from_host >= self.limits.max_pending_per_address:
                why = f"{from_host} connections from this address await association already"
            elif (
                len(pending) >= self.limits.max_pending
                and (victim := _most_pending(pending, from_host)) is None
            ):
                why = f"{len(pending)} connections await association already"
            else:
                conn = Connection(host, port, now, sock.dup())
                self._conns[id(conn)] = conn
                if self.board is not None:
                    self.board.set(len(self._conns))
                if victim is None:
                    return conn
        if victim is None:
            self._junk(GuardEvent("rejected", host, "", why))
            return None
        # Every pending place is taken, most by one address: its oldest
        # connection makes room. Many hosts each sending junk below their
        # own cap could otherwise keep every newcomer out.
        self.cut(
            victim,
            f"evicted for a connection from another address: {len(pending)} connections "
            "awaited association (scp.max_pending_per_address)",
        )
        return conn

    def admit(self, conn: Connection, calling_ae: str, bound: bool = False) -> str | None:
        """Count the association as admitted; returns why not, if the limit is reached.

        `bound`: an allowed_peers rule ties `calling_ae` to this address. The
        share of a calling AE title counts bound and unbound associations
        apart, so that anybody calling with a modality's title (AE titles are
        not authenticated) cannot take the share of the modality itself.
        """
        limits = self.limits
        idle: Connection | None = None
        with self._lock:
            conn.calling_ae = calling_ae
            conn.bound = bound
            # One we asked to release (idle) holds its slot no more.
            admitted = [c for c in self._conns.values() if c.admitted and not c.idle_released]
            if len(admitted) >= self.max_associations:
                why = f"{len(admitted)} associations in progress (scp.max_associations)"
                # Full: the association idle longest makes room, if one is
                # idle (the peer retries this request in a moment).
                idle = self._longest_idle(admitted, time.monotonic())
            else:
                from_host = sum(c.address == conn.address for c in admitted)
                same_ae = sum(c.calling_ae == calling_ae and c.bound == bound for c in admitted)
                if from_host >= limits.max_associations_per_address:
                    why = (
                        f"{from_host} associations in progress from this address "
                        "(scp.max_associations_per_address)"
                    )
                elif same_ae >= limits.max_associations_per_calling_ae:
                    why = (
                        f"{same_ae} associations in progress from this calling AE title "
                        "(scp.max_associations_per_calling_ae)"
                    )
                else:
                    conn.admitted = True
                    conn.admitted_at = time.monotonic()
                    # A connection that became an association gives its token
                    # back: only those that never do (scans, junk) spend the
                    # address's rate; one association per image is never slowed.
                    bucket = self._buckets.get(conn.address)
                    if bucket is not None:
                        bucket.tokens = min(float(limits.connection_burst), bucket.tokens + 1)
                    return None
        if idle is not None:
            self._release_idle(idle)
            why += ": an idle one is being released, retry"
        return why

    def release(self, conn: Connection) -> None:
        with self._lock:
            if conn.closed:
                return
            conn.closed = True
            self._conns.pop(id(conn), None)
            if self.board is not None:
                self.board.set(len(self._conns))
            silent = not conn.reported and conn.cut_reason is None
            self._closed_since_trim += 1
        if silent:
            # A malformed or incomplete request that pynetdicom aborted on its
            # own, or a connection opened and closed (a scan, a health check).
            why = "closed before an association was established: malformed or incomplete request"
            if conn.protocol_note:
                why += f" ({conn.protocol_note})"
            self._junk(GuardEvent("aborted", conn.address, conn.calling_ae, why, conn.id))
        with contextlib.suppress(OSError):
            conn.control.close()

    def counts(self) -> tuple[int, int]:
        """(pending, admitted) connections."""
        with self._lock:
            admitted = sum(c.admitted for c in self._conns.values())
            return len(self._conns) - admitted, admitted

    # -- cutting -----------------------------------------------------------
    def cut(self, conn: Connection, reason: str, shutdown: bool = True) -> None:
        """Close the connection, logged and reported once.

        `shutdown=False`: the caller sends an A-ABORT first; the reaper closes
        the connection if the peer has not within `_CLOSE_GRACE`.
        """
        with self._lock:
            first = conn.cut_reason is None and not conn.closed
            if first:
                conn.cut_reason = reason
                conn.cut_at = time.monotonic()
        if not first:
            return
        event = GuardEvent("aborted", conn.address, conn.calling_ae, reason, conn.id)
        if conn.admitted:
            log.warning("connection from %s closed: %s", conn.peer, reason)
            self._event(event)
        else:
            self._junk(event)
        if shutdown:
            self._shutdown(conn)

    @staticmethod
    def _shutdown(conn: Connection) -> None:
        with contextlib.suppress(OSError):
            conn.control.shutdown(socket.SHUT_RDWR)

    def _junk(self, event: GuardEvent) -> None:
        """A connection that never became an association: reported once per address."""
        if self.junk.first(event):
            self._report(event)

    def _report(self, event: GuardEvent) -> None:
        verb = "refused" if event.kind == "rejected" else "closed"
        log.warning("connection from %s %s: %s", event.address, verb, event.reason)
        self._event(event)

    def _reap_loop(self) -> None:
        limits = self.limits
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns.values())
            for conn in conns:
                if conn.started and conn.assoc is not None and not conn.assoc.is_alive():
                    self.release(conn)
                elif conn.cut_reason is not None:
                    if now - conn.cut_at > _CLOSE_GRACE:
                        self._shutdown(conn)  # the A-ABORT went out; the peer stays
                elif not conn.admitted and now - conn.accepted_at > limits.request_timeout:
                    self.cut(
                        conn,
                        f"no association admitted within {limits.request_timeout:g} s "
                        "of the connection",
                    )
                elif conn.admitted and conn.messages == 0 and self._idle(conn, now):
                    self._release_idle(conn)
            for event in self.junk.flush(now):
                self._report(event)
            self._trim()
            self._forget_buckets(now)

    def _idle(self, conn: Connection, now: float) -> bool:
        """Nothing arriving, nothing being served, for `idle_association`.

        A large first C-STORE arriving PDU by PDU is not idle; a PDU begun
        and not finished is the PDU deadline's business (`pdu_timeout`).
        """
        assoc = conn.assoc
        return (
            not conn.idle_released
            and not conn.in_pdu
            and not getattr(assoc, "serving", False)
            and now - max(conn.admitted_at, conn.last_pdu_at) > self.limits.idle_association
        )

    def _longest_idle(self, admitted: list[Connection], now: float) -> Connection | None:
        idle = [c for c in admitted if self._idle(c, now)]
        return min(idle, key=lambda c: max(c.admitted_at, c.last_pdu_at)) if idle else None

    def _release_idle(self, conn: Connection) -> None:
        """Release an idle association (see `reactor.ReactiveAssociation._release_for`).

        Never used: no DIMSE message within `idle_association` of the
        association (always). Used, then idle that long: only when every
        slot is taken and another peer asks for one (`admit`); a modality
        may pause between series, and the network timeout is its limit.
        """
        assoc = conn.assoc
        if assoc is None or not hasattr(assoc, "release_reason"):
            return
        with self._lock:
            if conn.idle_released:
                return
            conn.idle_released = True
            conn.release_asked_at = time.monotonic()
        seconds = f"{self.limits.idle_association:g} s"
        why = (
            f"no DIMSE message within {seconds} of the association: released"
            if conn.messages == 0
            else f"idle for {seconds} while every association was in use: released"
        )
        why += " (scp.idle_association_seconds)"
        log.warning("association from %s %s", conn.peer, why)
        self._event(GuardEvent("released", conn.address, conn.calling_ae, why, conn.id))
        reactive = cast(reactor.ReactiveAssociation, assoc)
        reactive.release_reason = why
        reactive.activity.set()

    def keep(self, conn: Connection) -> bool:
        """The reactor's last look before it releases: False if the peer woke up meanwhile."""
        with self._lock:
            woke = conn.in_pdu or conn.last_pdu_at > conn.release_asked_at
            if woke:
                conn.idle_released = False
            return not woke

    def _forget_buckets(self, now: float) -> None:
        """Drop the buckets that are full again: they would be made the same."""
        full = self.limits.connection_burst / max(self.limits.connection_rate, 1e-9)
        with self._lock:
            stale = [h for h, b in self._buckets.items() if now - b.at > full]
            for host in stale:
                del self._buckets[host]

    def _trim(self) -> None:
        """After a burst, hand the freed heap back to the system.

        Each connection's threads allocate in glibc's per-thread arenas; a
        burst of a thousand left 150 MB resident after its threads ended.
        malloc_trim returns the free pages of every arena.
        """
        with self._lock:
            # Associations may stay open for hours: none waiting is enough.
            pending = any(not c.admitted for c in self._conns.values())
            if pending or self._closed_since_trim < _TRIM_AFTER:
                return
            self._closed_since_trim = 0
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _event(self, event: GuardEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("guard event callback failed")


def _most_pending(pending: list[Connection], from_host: int) -> Connection | None:
    """Who makes room in a full pending table, if anybody.

    The oldest connection of the address holding the most, if it holds more
    than the newcomer's; otherwise (many hosts, one or two each) the oldest
    of all, once it has waited `_STALE_PENDING`: an honest peer sends its
    request as soon as it has connected.
    """
    by_address: dict[str, list[Connection]] = {}
    for c in pending:
        by_address.setdefault(c.address, []).append(c)
    conns = max(by_address.values(), key=len)
    if len(conns) > from_host + 1:
        return min(conns, key=lambda c: c.accepted_at)
    oldest = min(pending, key=lambda c: c.accepted_at)
    return oldest if time.monotonic() - oldest.accepted_at > _STALE_PENDING else None


# Seconds after which a pending connection may make room for a newcomer.
_STALE_PENDING = 1.0
# Seconds a connection we cut may take to close after our A-ABORT.
_CLOSE_GRACE = 2.0
# Connections closed before the heap is trimmed, once none is open.
_TRIM_AFTER = 64


def _libc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None  # not glibc
    return trim


_malloc_trim = _libc_malloc_trim()


def _thread_connection() -> Connection | None:
    """The guarded connection the running thread serves (its DUL or association thread)."""
    thread: Any = threading.current_thread()
    dul = getattr(thread, "dul", thread)
    try:
        sock = dul.socket
    except Exception:
        return None
    conn = getattr(sock, "guard_conn", None)
    return conn if isinstance(conn, Connection) else None


class UnidentifiedPeerFilter(logging.Filter):
    """Fold pynetdicom's lines about a connection that is no association yet into ours.

    A garbage request makes pynetdicom log two to seven WARNING and ERROR
    lines (unknown PDU type, undecodable PDU), some of them empty once the
    traceback is dropped. For a connection not admitted, the first such line
    becomes the reason in the guard's one report (`JunkLedger`); the rest is
    dropped. Lines about admitted associations pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("pynetdicom") or record.levelno < logging.WARNING:
            return True
        conn = _thread_connection()
        if conn is None or conn.admitted:
            return True
        if not conn.protocol_note:
            text = record.getMessage().strip()
            # Scrubbed: it goes to the audit trail as well as the log.
            conn.protocol_note = printable(scrub_values(text), limit=120) if text else ""
        return False


_current = threading.local()


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with deadlines and a PDU length cap on reads.

    Installed by re-classing the instance pynetdicom creates (see
    `_GuardedRequestHandler`), so only `recv` changes.
    """

    guard_conn: Connection
    guard: ConnectionGuard

    def recv(self, nr_bytes: int) -> bytearray:
        conn, limits = self.guard_conn, self.guard.limits
        if nr_bytes != _PDU_HEADER:
            cap = limits.max_pdu if conn.admitted else limits.max_request_pdu
            if nr_bytes > cap:
                state = "admitted" if conn.admitted else "unidentified"
                self.guard.cut(
                    conn, f"declared PDU length {nr_bytes} over the limit {cap} ({state} peer)"
                )
                return bytearray()  # the DUL sees a short PDU: connection closed
        sock = self.socket
        assert sock is not None
        header = nr_bytes == _PDU_HEADER
        deadline = time.monotonic() + limits.pdu_timeout
        # Received in place: the length is capped above, and one buffer
        # filled by the kernel costs no copy per chunk.
        data = bytearray(nr_bytes)
        view = memoryview(data)
        got = 0
        try:
            while got < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                n = sock.recv_into(view[got:])
                if not n:
                    break
                got += n
        except TimeoutError:
            self.guard.cut(
                conn,
                f"PDU not received whole within {limits.pdu_timeout:g} s "
                f"({got} of {nr_bytes} bytes)",
            )
        except OSError:
            pass  # closed under us (a cut) or reset: the DUL handles the short read
        finally:
            view.release()
            with contextlib.suppress(OSError):
                sock.settimeout(limits.pdu_timeout)  # bounds blocked writes too
        if got < nr_bytes:
            del data[got:]  # short: the DUL sees the connection closed
        elif conn.admitted:
            # The DUL reads each PDU as its header, then its body.
            conn.in_pdu = header
            if not header:
                conn.last_pdu_at = time.monotonic()
        return data


class _ContextList(list[PresentationContext]):
    """The supported presentation contexts, copied cheaply for each association.

    pynetdicom deep-copies the server's contexts for every association. With
    every storage class and transfer syntax that is 40 ms of one core (each
    UID re-validated by a regular expression), paid again by each of four
    concurrent associations. A context holds immutable UIDs, flags and one
    list, so a shallow copy with its own list is the same isolation.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            new = copy.copy(context)
            new._transfer_syntax = list(context._transfer_syntax)
            copies.append(new)
        return copies


class _GuardedRequestHandler(RequestHandler):
    server: GuardedAssociationServer

    def handle(self) -> None:
        super().handle()  # creates the association and starts its thread
        conn: Connection = _current.conn
        conn.started = True

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        conn: Connection = _current.conn
        sock = assoc.dul.socket
        assert sock is not None
        sock.__class__ = GuardedSocket
        guarded: GuardedSocket = sock  # type: ignore[assignment]
        guarded.guard_conn = conn
        guarded.guard = self.server.guard
        conn.assoc = assoc
        # Also on the association: its socket is gone once the connection closed.
        assoc.guard_conn = conn  # type: ignore[attr-defined]
        release_timeout = min(5.0, self.server.guard.limits.pdu_timeout)
        reactor.adopt(assoc, self.server.refuse_store, release_timeout)
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """ThreadedAssociationServer with the connection guard; pass as `server_class`."""

    guard: ConnectionGuard
    tls_context: ssl.SSLContext | None
    # The SCP's answer to a C-STORE-RQ the reactor refuses (reactor.ScreenedDIMSE).
    refuse_store: reactor.RefuseStore | None = None
    # The listen backlog (socketserver's default is 5): a burst of connections
    # waits in the kernel instead of retrying its SYN a second or more later.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _GuardedRequestHandler
        self.last_loop = time.monotonic()
        # Accepted sockets awaiting their thread (sockets take no attributes).
        self._accepted: dict[int, Connection] = {}
        super().__init__(*args, **kwargs)
        # Each association starts from a copy of these; see `_ContextList`.
        self.contexts = _ContextList(self.contexts)
        # The base class would wrap (handshake) in the accept thread: take the context away.
        self.tls_context, self.ssl_context = self.ssl_context, None

    # How long a process holding more connections than another lets that one
    # take a new connection before it takes it itself (the other may be stuck).
    defer_seconds = 0.05

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        board = self.guard.board
        if board is not None and board.others_less_busy():
            # poll, not select: no FD_SETSIZE limit on a busy server's descriptors.
            pending = select.poll()
            pending.register(self.socket, select.POLLIN)
            deadline = time.monotonic() + self.defer_seconds
            while board.others_less_busy() and time.monotonic() < deadline:
                time.sleep(0.001)
                if not pending.poll(0):
                    raise OSError("connection taken by a less busy receiving process")
        try:
            return self.socket.accept()
        except BlockingIOError as exc:
            # A shared listening socket is non-blocking (SharedSocketAssociationServer):
            # another process took the connection. socketserver skips an OSError.
            raise OSError("connection taken by another receiving process") from exc

    def verify_request(self, request: Any, client_address: Any) -> bool:
        conn = self.guard.register(request, client_address)
        if conn is None:
            return False
        self._accepted[id(request)] = conn
        return True

    def service_actions(self) -> None:
        # Called by serve_forever on every loop, busy or idle: the liveness stamp.
        self.last_loop = time.monotonic()
        # Not pynetdicom's: it runs a full gc.collect() every 60th turn, which
        # walks the whole heap with the GIL held (90-250 ms in `serve`) and so
        # stalls every association of the process. Python's own collector
        # frees finished associations' cycles; start-up's objects are frozen
        # out of its passes (daemon/service.py, daemon/receivers.py).

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = self._accepted.pop(id(request))
        limits = self.guard.limits
        try:
            request.settimeout(limits.pdu_timeout)
            if self.tls_context is not None:
                request = self.tls_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False
                )
                request.do_handshake()
        except (OSError, ValueError) as exc:
            reason = f"TLS handshake failed: {type(exc).__name__}"
            if conn.cut_reason is None:
                self.guard.cut(conn, reason)
            self.shutdown_request(request)
            self.guard.release(conn)
            return
        _current.conn = conn
        try:
            super().process_request_thread(request, client_address)
        finally:
            _current.conn = None
            if conn.assoc is None:  # never became an association
                self.guard.release(conn)


class SharedSocketAssociationServer(GuardedAssociationServer):
    """A guarded server on a listening socket that other processes accept from too.

    The receiving processes of daemon/receivers.py share one listening
    socket (inherited, not bound again). Every process waits on it; the one
    that calls accept() first takes the connection, and that is the one whose
    interpreter is least busy. SO_REUSEPORT would instead hash each peer's
    port to a process: four associations land 3 + 1 or 4 + 0 more often than
    2 + 2, and one core idles while the other is saturated.

    `listening` is set on a subclass (`sharing`) before the server is made.
    """

    listening: socket.socket

    @classmethod
    def sharing(cls, listening: socket.socket) -> type[SharedSocketAssociationServer]:
        return type(cls.__name__, (cls,), {"listening": listening})

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self.socket = self.listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already, with the backlog its owner gave it
