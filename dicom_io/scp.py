"""The DICOM SCP: Verification and Storage, with access control and draining.

A thin layer over pynetdicom. It knows the network and nothing about the
database: each received object is handed, as the raw bytes the peer sent, to
the `on_store` callback, whose return value is the C-STORE status.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.commitment import CommitmentReport, parse_event_report
from dicom_io.sopclasses import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES

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


@dataclass(frozen=True)
class AssociationOutcome:
    accepted: bool
    calling_ae: str
    address: str
    reason: str = ""


@dataclass
class SCPSettings:
    ae_title: str
    host: str
    port: int
    max_associations: int = 10
    max_pdu_size: int = 0
    allowed_peers: Sequence[PeerRule] = field(default_factory=tuple)
    ssl_context: ssl.SSLContext | None = None


class StorageSCP:
    def __init__(
        self,
        settings: SCPSettings,
        on_store: Callable[[ReceivedObject], int],
        on_association: Callable[[AssociationOutcome], None] | None = None,
        on_commitment: Callable[[CommitmentReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_store = on_store
        self._on_association = on_association
        self._on_commitment = on_commitment
        self._draining = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_size
        # A study can pause between series; do not drop a slow modality early.
        ae.network_timeout = 120
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.add_supported_context(Verification)
        for uid in IMAGE_STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if on_commitment is not None:
            # The PACS opens the association that carries its N-EVENT-REPORT
            # and acts as the Storage Commitment SCP on it: accept both roles.
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self._ae = ae

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        handlers = [
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
        ]
        if self._on_commitment is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self._handle_event_report))
        s = self.settings
        self._server = self._ae.start_server(
            (s.host, s.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=s.ssl_context,
        )
        log.info(
            "SCP %s listening on %s:%d (tls=%s)",
            s.ae_title,
            s.host,
            self.port,
            s.ssl_context is not None,
        )

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        if self._server is None:
            return 0
        return len(self._server.active_associations)

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

    def is_alive(self) -> bool:
        return self._server is not None

    # -- handlers (run in the association's thread) ----------------------
    def _peer(self, event: evt.Event) -> tuple[str, str]:
        req = event.assoc.requestor
        # In EVT_REQUESTED pynetdicom has not yet copied the calling AE title
        # from the A-ASSOCIATE-RQ to `requestor.ae_title` (it does so during
        # negotiation, after the handler): read it from the request itself.
        ae_title = req.primitive.calling_ae_title if req.primitive is not None else req.ae_title
        return str(ae_title).strip(), str(req.address)

    def _reject(
        self, event: evt.Event, source: int, diagnostic: int, result: int, why: str
    ) -> None:
        ae_title, address = self._peer(event)
        event.assoc.acse.send_reject(result, source, diagnostic)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is out
        # and the peer has closed. Otherwise the reactor closes the socket at
        # once and the peer often sees an abort instead of the rejection.
        event.assoc.kill()
        log.warning("association from %s@%s rejected: %s", ae_title, address, why)
        self._notify(AssociationOutcome(False, ae_title, address, why))

    def _handle_requested(self, event: evt.Event) -> None:
        ae_title, address = self._peer(event)
        if self._draining.is_set():
            # Transient: the modality should retry once we are back.
            self._reject(event, 0x03, 0x01, 0x02, "shutting down")
            return
        rules = self.settings.allowed_peers
        if rules and not any(rule.allows(ae_title, address) for rule in rules):
            self._reject(event, 0x01, 0x03, 0x01, "calling AE title not allowed from this address")

    def _handle_accepted(self, event: evt.Event) -> None:
        ae_title, address = self._peer(event)
        log.info("association accepted from %s@%s", ae_title, address)
        self._notify(AssociationOutcome(True, ae_title, address))

    def _notify(self, outcome: AssociationOutcome) -> None:
        if self._on_association is None:
            return
        try:
            self._on_association(outcome)
        except Exception:
            log.exception("association callback failed")

    def _handle_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _handle_store(self, event: evt.Event) -> int:
        ae_title, address = self._peer(event)
        req = event.request
        obj = ReceivedObject(
            calling_ae=ae_title,
            address=address,
            sop_class_uid=str(req.AffectedSOPClassUID),
            sop_instance_uid=str(req.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            dataset=event.encoded_dataset(include_meta=False),
            file_bytes=event.encoded_dataset(include_meta=True),
        )
        try:
            return self._on_store(obj)
        except Exception:
            # Never let one object take the association down: refuse it and go on.
            log.exception("store handler failed for SOP instance %s", obj.sop_instance_uid)
            return 0xA700

    def _handle_event_report(self, event: evt.Event) -> tuple[int, None]:
        """A storage commitment result for requests we sent (dicom_io/commitment.py)."""
        ae_title, address = self._peer(event)
        if event.request.AffectedSOPClassUID != StorageCommitmentPushModel:
            return 0x0118, None  # No such SOP Class
        try:
            report = parse_event_report(event.event_type, event.event_information, ae_title)
        except Exception as exc:
            log.warning("invalid storage commitment report from %s@%s: %s", ae_title, address, exc)
            return 0x0115, None  # Invalid argument value
        assert self._on_commitment is not None
        try:
            self._on_commitment(report)
        except Exception:
            # The PACS may send the report again; we also ask again when it is late.
            log.exception("storage commitment callback failed")
            return 0x0110, None
        return 0x0000, None
