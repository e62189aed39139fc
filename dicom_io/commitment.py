"""Storage commitment (PS3.4 Annex J, push model), the SCU side.

We ask with an N-ACTION on the association we open; the PACS answers later
with an N-EVENT-REPORT on an association it opens to our SCP (the usual,
asynchronous way, and the only one Orthanc uses). `StorageSCP` hands each
report, parsed by `parse_event_report`, to its `on_commitment` callback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from dicom_io import status as dimse
from dicom_io.scu import AssociationFailed, RemoteAE, new_ae

log = logging.getLogger(__name__)

ACTION_REQUEST_COMMIT = 1  # Action Type ID of "Request Storage Commitment"
EVENT_ALL_COMMITTED = 1  # Event Type ID: every referenced instance committed
EVENT_SOME_FAILED = 2  # Event Type ID: at least one failed

# Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
FAILURE_REASONS = {
    dimse.PROCESSING_FAILURE: "processing failure",
    dimse.NO_SUCH_SOP_INSTANCE: "no such object instance",
    dimse.RESOURCE_LIMITATION: "resource limitation",
    dimse.SOP_CLASS_NOT_SUPPORTED: "referenced SOP class not supported",
    dimse.CLASS_INSTANCE_CONFLICT: "class / instance conflict",
    dimse.DUPLICATE_TRANSACTION_UID: "duplicate transaction UID",
}


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT: which instances of a transaction are committed."""

    transaction_uid: str
    calling_ae: str
    committed: tuple[str, ...]  # SOP Instance UIDs
    failed: tuple[tuple[str, int | None], ...]  # (SOP Instance UID, Failure Reason)


def new_transaction_uid() -> str:
    """A fresh Transaction UID: one per N-ACTION, never reused (PS3.4 J.3.2.1)."""
    return str(generate_uid())


def commitment_request(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: the transaction and (class, instance) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class_uid, sop_instance_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    remote: RemoteAE, transaction_uid: str, references: Sequence[tuple[str, str]]
) -> int:
    """Send the N-ACTION; returns its status (0 means the request was accepted).

    Acceptance is not commitment: the result comes in the N-EVENT-REPORT.
    Raises AssociationFailed when the peer cannot be reached, refuses the
    association or does not support Storage Commitment.
    """
    if not references:
        raise ValueError("nothing to ask a commitment for")
    ae = new_ae(remote)
    ae.add_requested_context(StorageCommitmentPushModel)
    tls = None
    if remote.ssl_context is not None:
        tls = (remote.ssl_context, remote.tls_server_name or remote.host)
    assoc = ae.associate(remote.host, remote.port, ae_title=remote.ae_title, tls_args=tls)
    if not assoc.is_established:
        where = f"{remote.ae_title}@{remote.host}:{remote.port}"
        if assoc.rejected_contexts:
            # Our only context refused: pynetdicom aborts, which alone would
            # read like a network failure. It is a PACS setting to fix.
            raise AssociationFailed(f"{where} does not accept Storage Commitment")
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise AssociationFailed(f"association to {where} {why}")
    try:
        status, _reply = assoc.send_n_action(
            commitment_request(transaction_uid, references),
            ACTION_REQUEST_COMMIT,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
        if not status or "Status" not in status:
            raise AssociationFailed(f"no N-ACTION response from {remote.ae_title}")
        return int(status.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def parse_event_report(event_type: int, info: Dataset, calling_ae: str) -> CommitmentReport:
    """The Event Information of a storage commitment N-EVENT-REPORT.

    Raises ValueError when it is not one (wrong event type, no Transaction UID).
    """
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        raise ValueError(f"event type {event_type} is not a storage commitment result")
    if "TransactionUID" not in info:
        raise ValueError("storage commitment report without Transaction UID")
    committed = tuple(
        str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
    )
    failed = tuple(
        (
            str(item.ReferencedSOPInstanceUID),
            int(item.FailureReason) if "FailureReason" in item else None,
        )
        for item in info.get("FailedSOPSequence", [])
    )
    return CommitmentReport(str(info.TransactionUID), calling_ae, committed, failed)


def failure_text(reason: int | None) -> str:
    if reason is None:
        return "storage commitment failed (no reason given)"
    name = FAILURE_REASONS.get(reason, "unknown reason")
    return f"storage commitment failed: 0x{reason:04X} {name}"
