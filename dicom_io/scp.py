"""The DICOM SCP: Verification and Storage, with access control and draining.

A thin layer over pynetdicom. It knows the network and nothing about the
database: each received object is handed, as the raw bytes the peer sent, to
the `on_store` callback, whose return value is the C-STORE status. Every
association accepted, rejected or cut goes to `on_association`, from one
notifier thread, so that a slow audit write never holds a network thread.
The connection-level defences (deadlines, PDU caps, per-address limits)
live in dicom_io/guard.py.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_EVENT_REPORT, N_SET
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
    Verification,
)

from dicom_io import mpps, status
from dicom_io.commitment import CommitmentReport, parse_event_report
from dicom_io.guard import (
    Connection,
    ConnectionGuard,
    GuardedAssociationServer,
    GuardEvent,
    GuardLimits,
    LoadBoard,
    SharedSocketAssociationServer,
)
from dicom_io.part10 import part10_file
from dicom_io.reactor import RefusedStore
from dicom_io.sopclasses import IMAGE_STORAGE_CLASSES, STORAGE_CLASSES, TRANSFER_SYNTAXES
from dicom_io.text import printable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerRule:
    """A calling AE title allowed in, optionally only from some addresses."""

    ae_title: str
    addresses: Sequence[str] = ()

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title != self.ae_title:
            return False
        if not self.addresses:
            return True
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(a, strict=False) for a in self.addresses)


@dataclass(frozen=True)
class ReceivedObject:
    """One C-STORE request as received, nothing decoded."""

    calling_ae: str
    address: str
    sop_class_uid: str  # Affected SOP Class UID of the request
    sop_instance_uid: str  # Affected SOP Instance UID of the request
    transfer_syntax_uid: str
    dataset: bytes  # the dataset as sent, without file meta
    file_bytes: bytes  # preamble + file meta + dataset, ready for disk
    association_id: str | None = None  # names the association in the audit trail


OutcomeKind = Literal["accepted", "rejected", "aborted", "released"]


@dataclass(frozen=True)
class AssociationOutcome:
    kind: OutcomeKind
    calling_ae: str  # escaped: safe to log
    address: str
    reason: str = ""
    association_id: str | None = None
    # Connections this outcome stands for: more than one in the guard's
    # summaries of connections that never became an association.
    count: int = 1

    @property
    def accepted(self) -> bool:
        return self.kind == "accepted"


@dataclass
class SCPSettings:
    ae_title: str
    host: str
    port: int
    max_associations: int = 10
    max_pdu_size: int = 1024 * 1024
    allowed_peers: Sequence[PeerRule] = field(default_factory=tuple)
    ssl_context: ssl.SSLContext | None = None
    # Refuse an A-ASSOCIATE-RQ addressed to another called AE title.
    check_called_ae_title: bool = True
    # Storage SOP classes refused at negotiation; "non-image" stands for all
    # classes that are not images.
    refused_sop_classes: Collection[str] = ()
    request_timeout: float = 10.0
    pdu_timeout: float = 60.0
    max_pending_per_address: int = 16
    # See GuardLimits, and the README's "Hostile peers" for the defaults' reasons.
    connection_rate_per_address: float = 20.0
    connection_burst_per_address: int = 100
    idle_association_seconds: float = 15.0
    # None: half of max_associations (at least 1).
    max_associations_per_address: int | None = None
    max_associations_per_calling_ae: int | None = None
    junk_log_interval_seconds: float = 60.0
    # Open connections per receiving process, shared: who accepts next
    # (guard.LoadBoard). Set when several processes accept from one listening
    # socket (daemon/receivers.py); it is then non-blocking, so that a
    # process that lost the race for a connection goes on.
    load_board: LoadBoard | None = None
    # A receiving process's SCP takes the parent's listening socket instead of binding.
    listening_socket: socket.socket | None = None
    # Seconds the accept loop may go without a turn before is_alive says no.
    liveness_seconds: float = 10.0

    def guard_limits(self) -> GuardLimits:
        return GuardLimits(
            request_timeout=self.request_timeout,
            pdu_timeout=self.pdu_timeout,
            # Our PDVs are at most max_pdu_size; a few headers on top.
            max_pdu=self.max_pdu_size + 1024,
            max_pending_per_address=self.max_pending_per_address,
            max_pending=max(64, 4 * self.max_associations),
            connection_rate=self.connection_rate_per_address,
            connection_burst=self.connection_burst_per_address,
            idle_association=self.idle_association_seconds,
            max_associations_per_address=self._share(self.max_associations_per_address),
            max_associations_per_calling_ae=self._share(self.max_associations_per_calling_ae),
            junk_interval=self.junk_log_interval_seconds,
        )

    def _share(self, value: int | None) -> int:
        return value if value is not None else max(1, self.max_associations // 2)

    def accepted_storage_classes(self) -> list[str]:
        refused = set(self.refused_sop_classes)
        return [
            uid
            for uid in STORAGE_CLASSES
            if uid not in refused
            and not ("non-image" in refused and uid not in IMAGE_STORAGE_CLASSES)
        ]


class StorageSCP:
    def __init__(
        self,
        settings: SCPSettings,
        on_store: Callable[[ReceivedObject], int],
        on_association: Callable[[AssociationOutcome], None] | None = None,
        on_commitment: Callable[[CommitmentReport], None] | None = None,
        on_mpps: Callable[[mpps.ProcedureStepMessage], int] | None = None,
        on_refused: Callable[[ReceivedObject, int, str], None] | None = None,
    ) -> None:
        """`on_refused`: a C-STORE-RQ refused before `on_store` (its UIDs, an
        empty dataset), with its status and why; called from a network thread,
        it must not wait (the receiver queues its audit row)."""
        self.settings = settings
        self._on_store = on_store
        self._on_refused = on_refused
        self._on_mpps = on_mpps
        self._on_association = on_association
        self._on_commitment = on_commitment
        self._draining = threading.Event()
        self._server: GuardedAssociationServer | None = None
        self.guard = ConnectionGuard(
            settings.guard_limits(),
            settings.max_associations,
            self._on_guard_event,
            settings.load_board,
        )
        # Outcomes go to the callback from one thread, through a bounded queue:
        # a flood of refusals must not turn into a flood of blocked threads.
        self._outcomes: queue.Queue[AssociationOutcome | None] = queue.Queue(maxsize=1000)
        self._dropped = 0
        self._notifier = threading.Thread(target=self._notify_loop, name="scp-audit", daemon=True)
        ae = AE(ae_title=settings.ae_title)
        # The guard counts admitted associations itself (only those whose
        # request was accepted); pynetdicom's own count includes every open
        # connection, so keep it out of the way.
        limits = self.guard.limits
        ae.maximum_associations = settings.max_associations + limits.max_pending + 1
        ae.maximum_pdu_size = settings.max_pdu_size
        # A study can pause between series; do not drop a slow modality early.
        ae.network_timeout = 120
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.add_supported_context(Verification)
        for uid in settings.accepted_storage_classes():
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if on_commitment is not None:
            # The PACS opens the association that carries its N-EVENT-REPORT
            # and acts as the Storage Commitment SCP on it: accept both roles.
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        if on_mpps is not None:
            # Modalities report what they performed: completion without the quiet window.
            ae.add_supported_context(ModalityPerformedProcedureStep)
        self._ae = ae

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
        ]
        if self._on_commitment is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self._handle_event_report))
        if self._on_mpps is not None:
            handlers.append((evt.EVT_N_CREATE, self._handle_n_create))
            handlers.append((evt.EVT_N_SET, self._handle_n_set))
        s = self.settings
        self._notifier.start()
        self.guard.start()
        server_class: type[GuardedAssociationServer] = GuardedAssociationServer
        if s.listening_socket is not None:
            server_class = SharedSocketAssociationServer.sharing(s.listening_socket)
        server = self._ae.make_server(
            (s.host, s.port),
            evt_handlers=handlers,
            ssl_context=s.ssl_context,
            server_class=server_class,
        )
        assert isinstance(server, GuardedAssociationServer)
        server.refuse_store = self._refuse_store
        if s.load_board is not None:
            assert server.socket is not None
            server.socket.setblocking(False)  # shared by every receiving process
        server.guard = self.guard
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="scp-accept", daemon=True).start()
        self._server = server
        log.info(
            "SCP %s listening on %s:%d (tls=%s)",
            s.ae_title,
            s.host,
            self.port,
            s.ssl_context is not None,
        )

    @property
    def listening_socket(self) -> socket.socket:
        """The socket the receiving processes accept from too (daemon/receivers.py)."""
        assert self._server is not None and self._server.socket is not None
        return self._server.socket

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        """Associations admitted and not yet closed."""
        return self.guard.counts()[1]

    def drain(self, timeout: float) -> bool:
        """Refuse new associations, wait for running ones; True if all finished."""
        self._draining.set()
        deadline = time.monotonic() + timeout
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.active_associations == 0

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()
        self.guard.stop()
        self._outcomes.put(None)
        self._notifier.join(10)

    def is_alive(self) -> bool:
        """The accept loop turned recently (it turns every 0.5 s, busy or idle)."""
        server = self._server
        if server is None:
            return False
        return time.monotonic() - server.last_loop < self.settings.liveness_seconds

    # -- handlers (run in the association's thread) ----------------------
    def _peer(self, event: evt.Event) -> tuple[str, str]:
        """(calling AE title, address), the title escaped: it is the peer's text."""
        return self._peer_of(event.assoc)

    @staticmethod
    def _peer_of(assoc: Association) -> tuple[str, str]:
        req = assoc.requestor
        # In EVT_REQUESTED pynetdicom has not yet copied the calling AE title
        # from the A-ASSOCIATE-RQ to `requestor.ae_title` (it does so during
        # negotiation, after the handler): read it from the request itself.
        ae_title = req.primitive.calling_ae_title if req.primitive is not None else req.ae_title
        return printable(str(ae_title).strip()), str(req.address)

    @staticmethod
    def _conn(event: evt.Event) -> Connection | None:
        conn = getattr(event.assoc, "guard_conn", None)  # set by the guard's request handler
        return conn if isinstance(conn, Connection) else None

    def _reject(
        self, event: evt.Event, source: int, diagnostic: int, result: int, why: str
    ) -> None:
        ae_title, address = self._peer(event)
        self._reported(event)
        event.assoc.acse.send_reject(result, source, diagnostic)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out
        # and the peer has closed. Otherwise the reactor closes the socket at
        # once and the peer often sees an abort instead of the rejection.
        event.assoc.kill()
        log.warning("association from %s@%s rejected: %s", ae_title, address, why)
        self._notify(AssociationOutcome("rejected", ae_title, address, why, self._id(event)))

    def _handle_requested(self, event: evt.Event) -> None:
        ae_title, address = self._peer(event)
        primitive = event.assoc.requestor.primitive
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        if self._draining.is_set():
            # Transient: the modality should retry once we are back.
            self._reject(event, 0x03, 0x01, 0x02, "shutting down")
            return
        if self.settings.check_called_ae_title and called != self.settings.ae_title:
            # Unquoted: an AE title is configuration, not a patient value, and
            # the log scrubber hides quoted text (daemon/logs.py).
            self._reject(
                event, 0x01, 0x07, 0x01, f"called AE title [{printable(called, 16)}] is not ours"
            )
            return
        rules = self.settings.allowed_peers
        if rules and not any(rule.allows(ae_title, address) for rule in rules):
            self._reject(event, 0x01, 0x03, 0x01, "calling AE title not allowed from this address")
            return
        # Tied to its address by a rule: its share is its own (ConnectionGuard.admit).
        bound = any(rule.addresses and rule.allows(ae_title, address) for rule in rules)
        conn = self._conn(event)
        if conn is not None:
            full = self.guard.admit(conn, ae_title, bound)
            if full is not None:
                # Transient, local limit exceeded: the sender retries later.
                self._reject(event, 0x03, 0x02, 0x02, full)

    def _id(self, event: evt.Event) -> str | None:
        conn = self._conn(event)
        return conn.id if conn is not None else None

    def _reported(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            conn.reported = True

    def _handle_accepted(self, event: evt.Event) -> None:
        ae_title, address = self._peer(event)
        self._reported(event)
        log.info("association accepted from %s@%s", ae_title, address)
        self._notify(AssociationOutcome("accepted", ae_title, address, "", self._id(event)))

    def _handle_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections (protocol version, user identity...);
        # ours are reported in _reject.
        ae_title, address = self._peer(event)
        self._reported(event)
        why = "rejected during negotiation"
        log.warning("association from %s@%s rejected: %s", ae_title, address, why)
        self._notify(AssociationOutcome("rejected", ae_title, address, why, self._id(event)))

    def _handle_aborted(self, event: evt.Event) -> None:
        ae_title, address = self._peer(event)
        conn = self._conn(event)
        if conn is not None and (conn.cut_reason is not None or conn.idle_released):
            return  # we cut or released it: reported by the guard already
        why = "A-ABORT (by the peer, or after a protocol error)"
        log.warning("association from %s@%s aborted: %s", ae_title, address, why)
        self._notify(AssociationOutcome("aborted", ae_title, address, why, self._id(event)))

    def _handle_closed(self, event: evt.Event) -> None:
        conn = self._conn(event)
        if conn is not None:
            self.guard.release(conn)

    def _on_guard_event(self, event: GuardEvent) -> None:
        self._notify(
            AssociationOutcome(
                event.kind,  # type: ignore[arg-type]
                event.calling_ae,
                event.address,
                event.reason,
                event.association_id,
                event.count,
            )
        )

    def _notify(self, outcome: AssociationOutcome) -> None:
        if self._on_association is None:
            return
        try:
            self._outcomes.put_nowait(outcome)
        except queue.Full:
            self._dropped += 1

    def _notify_loop(self) -> None:
        while (outcome := self._outcomes.get()) is not None:
            if self._dropped:
                log.warning("%d association outcomes not audited (queue full)", self._dropped)
                self._dropped = 0
            assert self._on_association is not None
            try:
                self._on_association(outcome)
            except Exception:
                log.exception("association callback failed")

    def _handle_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _refuse_store(self, assoc: Association, refused: RefusedStore) -> int:
        """A C-STORE-RQ the reactor could not hand to `_handle_store`: 0xA900, audited.

        Runs in the DUL thread: `on_refused` must not wait for the database.
        """
        conn = getattr(assoc, "guard_conn", None)
        ae_title, address = self._peer_of(assoc)
        obj = ReceivedObject(
            calling_ae=ae_title,
            address=address,
            sop_class_uid=refused.sop_class_uid,
            sop_instance_uid=refused.sop_instance_uid,
            transfer_syntax_uid="",
            dataset=b"",
            file_bytes=b"",
            association_id=conn.id if conn is not None else None,
        )
        return self._refused(obj, status.DATASET_MISMATCH, refused.reason)

    def _refused(self, obj: ReceivedObject, code: int, why: str) -> int:
        if self._on_refused is not None:
            try:
                self._on_refused(obj, code, why)
            except Exception as exc:
                log.error("refusal callback failed: %s", type(exc).__name__)
        else:
            log.warning("refused a C-STORE from %s@%s: %s", obj.calling_ae, obj.address, why)
        return code

    def _handle_store(self, event: evt.Event) -> int:
        ae_title, address = self._peer(event)
        req = cast(C_STORE, event.request)
        sop_class_uid = str(req.AffectedSOPClassUID)
        sop_instance_uid = str(req.AffectedSOPInstanceUID)
        transfer_syntax_uid = str(event.context.transfer_syntax)
        dataset = event.encoded_dataset(include_meta=False)
        if not dataset:
            # Nothing to store, and nothing to read a UID from: not understood.
            obj = ReceivedObject(ae_title, address, sop_class_uid, sop_instance_uid,
                                 transfer_syntax_uid, b"", b"", self._id(event))  # fmt: skip
            return self._refused(obj, status.CANNOT_UNDERSTAND, "empty dataset (zero bytes)")
        obj = ReceivedObject(
            calling_ae=ae_title,
            address=address,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            dataset=dataset,
            file_bytes=part10_file(dataset, sop_class_uid, sop_instance_uid, transfer_syntax_uid),
            association_id=self._id(event),
        )
        try:
            return self._on_store(obj)
        except Exception as exc:
            # Never let one object take the association down: refuse it and go on.
            # One line: exception texts may quote values of the dataset.
            log.error(
                "store handler failed for SOP instance %s: %s",
                printable(obj.sop_instance_uid),
                type(exc).__name__,
            )
            log.debug("store handler traceback", exc_info=exc)
            return status.OUT_OF_RESOURCES

    def _handle_event_report(self, event: evt.Event) -> tuple[int, None]:
        """A storage commitment result for requests we sent (dicom_io/commitment.py)."""
        ae_title, address = self._peer(event)
        req = cast(N_EVENT_REPORT, event.request)
        if req.AffectedSOPClassUID != StorageCommitmentPushModel:
            return status.NO_SUCH_SOP_CLASS, None
        try:
            report = parse_event_report(
                cast(int, event.event_type), event.event_information, ae_title
            )
        except Exception as exc:
            log.warning("invalid storage commitment report from %s@%s: %s", ae_title, address, exc)
            return status.INVALID_ARGUMENT_VALUE, None
        assert self._on_commitment is not None
        try:
            self._on_commitment(report)
        except Exception:
            # The PACS may send the report again; we also ask again when it is late.
            log.exception("storage commitment callback failed")
            return status.PROCESSING_FAILURE, None
        return status.SUCCESS, None

    # -- MPPS (dicom_io/mpps.py) -------------------------------------------
    def _handle_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        req = cast(N_CREATE, event.request)
        if req.AffectedSOPClassUID != ModalityPerformedProcedureStep:
            return status.NO_SUCH_SOP_CLASS, None
        uid = str(req.AffectedSOPInstanceUID or "")
        return self._mpps(event, "create", uid, lambda: event.attribute_list)

    def _handle_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        req = cast(N_SET, event.request)
        if req.RequestedSOPClassUID != ModalityPerformedProcedureStep:
            return status.NO_SUCH_SOP_CLASS, None
        uid = str(req.RequestedSOPInstanceUID or "")
        return self._mpps(event, "set", uid, lambda: event.modification_list)

    def _mpps(
        self,
        event: evt.Event,
        kind: Literal["create", "set"],
        uid: str,
        dataset: Callable[[], Dataset],
    ) -> tuple[int, Dataset | None]:
        ae_title, address = self._peer(event)
        if not uid:
            return mpps.INVALID_ATTRIBUTE_VALUE, None
        try:
            content = dataset()
            message = mpps.parse(kind, uid, content, ae_title)
        except Exception as exc:
            log.warning(
                "invalid MPPS N-%s from %s@%s: %s", kind.upper(), ae_title, address,
                type(exc).__name__,
            )  # fmt: skip
            return mpps.INVALID_ATTRIBUTE_VALUE, None
        assert self._on_mpps is not None
        code = self._on_mpps(message)
        # The attributes as the SCP now holds them: what was sent.
        return code, content if code == mpps.SUCCESS else None
