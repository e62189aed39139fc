"""Modality Performed Procedure Step (PS3.4 F.7): what the modality says it did.

The SCP (dicom_io/scp.py) takes N-CREATE and N-SET for the MPPS SOP class
and hands each message over as a `ProcedureStepMessage`: the step's UID, its
status, the study it belongs to, and the SOP Instance UIDs it lists in its
Performed Series Sequence. A COMPLETED step that lists every instance of a
study lets the study complete as soon as the last of them has arrived,
instead of after the quiet window (db/studies.complete_by_mpps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset

# DIMSE statuses (PS3.4 F.7.2, PS3.7 C), named in dicom_io/status.py; mpps.NAME for the SCP.
from dicom_io.status import DUPLICATE_SOP_INSTANCE as DUPLICATE_SOP_INSTANCE
from dicom_io.status import INVALID_ATTRIBUTE_VALUE as INVALID_ATTRIBUTE_VALUE
from dicom_io.status import NO_LONGER_UPDATABLE as NO_LONGER_UPDATABLE
from dicom_io.status import NO_SUCH_SOP_INSTANCE as NO_SUCH_SOP_INSTANCE
from dicom_io.status import PROCESSING_FAILURE as PROCESSING_FAILURE
from dicom_io.status import SUCCESS as SUCCESS

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = (COMPLETED, DISCONTINUED)



@dataclass(frozen=True)
class ProcedureStepMessage:
    kind: Literal["create", "set"]
    sop_instance_uid: str
    calling_ae: str
    status: str | None  # Performed Procedure Step Status, when the message sets it
    study_instance_uid: str | None
    instance_uids: list[str] | None  # listed in Performed Series Sequence, when given


class InvalidProcedureStep(ValueError):
    pass


def parse(
    kind: Literal["create", "set"], sop_instance_uid: str, dataset: Dataset, calling_ae: str
) -> ProcedureStepMessage:
    """The message's content; InvalidProcedureStep for a status or UID we cannot take."""
    status = dataset.get("PerformedProcedureStepStatus")
    status = str(status).strip().upper() if status else None
    if kind == "create" and status is None:
        status = IN_PROGRESS
    if status is not None and status not in STATUSES:
        raise InvalidProcedureStep(f"unknown Performed Procedure Step Status {status!r}")
    study_uid = None
    for item in dataset.get("ScheduledStepAttributesSequence") or []:
        if item.get("StudyInstanceUID"):
            study_uid = str(item.StudyInstanceUID)
            break
    instance_uids = None
    if "PerformedSeriesSequence" in dataset:
        instance_uids = [
            str(ref.ReferencedSOPInstanceUID)
            for series in dataset.PerformedSeriesSequence
            for ref in series.get("ReferencedImageSequence") or []
            if ref.get("ReferencedSOPInstanceUID")
        ]
    return ProcedureStepMessage(
        kind, sop_instance_uid, calling_ae, status, study_uid, instance_uids
    )
