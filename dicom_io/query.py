"""Pulling studies from a PACS: C-FIND (Study Root) and C-MOVE to our own AE.

The PACS sends the images to our SCP on a new association, exactly as a
modality would, so a pulled study takes the same receive path: spool,
database, completion, analysis. The PACS must know our AE title, host and
port (its modality table).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_io.identify import valid_uid
from dicom_io.scu import AssociationFailed, RemoteAE, associate, new_ae
from dicom_io.status import CANNOT_UNDERSTAND, PENDING, PENDING_WITH_WARNING, SUCCESS

_PENDING = (PENDING, PENDING_WITH_WARNING)


@dataclass(frozen=True)
class StudyMatch:
    """One C-FIND match. No patient attributes: callers log and print these."""

    study_instance_uid: str
    study_date: str
    modalities: str
    accession_number: str
    number_of_instances: int | None


@dataclass(frozen=True)
class MoveResult:
    status: int
    completed: int
    failed: int
    warning: int

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and self.failed == 0


def _joined(value: object) -> str:
    """A multi-valued CS as DICOM writes it (CT\\PT); pydicom gives str or a list."""
    if value is None or isinstance(value, str):
        return value or ""
    return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]


def find_studies(
    remote: RemoteAE,
    *,
    study_date: str = "",
    modality: str = "",
    accession_number: str = "",
    study_instance_uid: str = "",
    study_description: str = "",
) -> list[StudyMatch]:
    """C-FIND at STUDY level; empty filters are universal matching.

    `study_date` may be a range ("20261201-20261202"), `study_description`
    may hold wildcards ("*CHEST*"), as C-FIND matching defines them.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    query.StudyDate = study_date
    query.StudyDescription = study_description
    query.ModalitiesInStudy = modality
    query.AccessionNumber = accession_number
    query.NumberOfStudyRelatedInstances = ""
    ae = new_ae(remote)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(ae, remote)
    matches: list[StudyMatch] = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            if not status:
                raise AssociationFailed("C-FIND: no response from the peer")
            code = int(status.Status)
            if code in _PENDING and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", ""))
                if not valid_uid(uid):
                    continue
                n = identifier.get("NumberOfStudyRelatedInstances")
                matches.append(
                    StudyMatch(
                        study_instance_uid=uid,
                        study_date=str(identifier.get("StudyDate", "") or ""),
                        modalities=_joined(identifier.get("ModalitiesInStudy")),
                        accession_number=str(identifier.get("AccessionNumber", "") or ""),
                        number_of_instances=int(n) if n not in (None, "") else None,
                    )
                )
            elif code != SUCCESS:
                raise AssociationFailed(f"C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return matches


def move_study(remote: RemoteAE, study_instance_uid: str, destination_ae: str) -> MoveResult:
    """C-MOVE one study to `destination_ae` (normally our own AE title)."""
    if not valid_uid(study_instance_uid):
        raise ValueError("not a valid Study Instance UID")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    ae = new_ae(remote)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(ae, remote)
    final = MoveResult(CANNOT_UNDERSTAND, 0, 0, 0)
    try:
        for status, _identifier in assoc.send_c_move(
            query, destination_ae, StudyRootQueryRetrieveInformationModelMove
        ):
            if not status:
                raise AssociationFailed("C-MOVE: no response from the peer")
            code = int(status.Status)
            if code not in _PENDING:
                final = MoveResult(
                    status=code,
                    completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                    failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
                    warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return final
