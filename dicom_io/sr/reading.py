"""Reading a TID 1500 SR's findings back: ours, or as a PACS returns them."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from pydicom.dataset import Dataset

from dicom_io import codes as sr_codes
from dicom_io.sr.content import (
    ABSENT_KEY,
    COMMENT,
    FINDING,
    FINDING_SITE,
    IMAGE_REGION,
    PRESENT_KEY,
    TRACKING_IDENTIFIER,
    TRACKING_UID,
    code_value,
    coded,
    concept_key,
    concept_name,
    measurement_groups,
)
from model.results import (
    CodedConcept,
)


class SRFinding(TypedDict):
    """One measurement group of a TID 1500 SR, as `read_findings` returns it."""

    tracking_identifier: str | None
    tracking_uid: str | None
    finding_type: CodedConcept | None
    finding_site: CodedConcept | None
    present: bool | None  # qualitative evaluation Present / Absent
    probability: float | None
    referenced_sop_instance_uid: str | None  # image of the SCOORD, if any
    referenced_frame_numbers: list[int] | None
    graphic_type: str | None
    graphic_data: list[tuple[float, float]] | None  # (column, row)
    comment: str | None  # the label: the AI's sentence, or the reviewer's (verified SR)


def read_findings(sr: Dataset) -> list[SRFinding]:
    """The measurement groups of a TID 1500 SR, one record per finding.

    Works on what we write and on what comes back from a PACS (plain pydicom
    datasets, no highdicom parsing). An SR without an Imaging Measurements
    container (e.g. the not-run SR) gives [].
    """
    findings = []
    for group in measurement_groups(sr):
        found = SRFinding(
            tracking_identifier=None,
            tracking_uid=None,
            finding_type=None,
            finding_site=None,
            present=None,
            probability=None,
            referenced_sop_instance_uid=None,
            referenced_frame_numbers=None,
            graphic_type=None,
            graphic_data=None,
            comment=None,
        )
        for item in group.ContentSequence:
            name = concept_name(item)
            if name == TRACKING_IDENTIFIER:
                found["tracking_identifier"] = str(item.TextValue)
            elif name == TRACKING_UID:
                found["tracking_uid"] = str(item.UID)
            elif name == FINDING:
                found["finding_type"] = coded(item.ConceptCodeSequence[0])
            elif name == FINDING_SITE:
                found["finding_site"] = coded(item.ConceptCodeSequence[0])
            elif item.ValueType == "CODE" and code_value(item) in (PRESENT_KEY, ABSENT_KEY):
                found["present"] = code_value(item) == PRESENT_KEY
            elif item.ValueType == "NUM" and name == concept_key(sr_codes.PROBABILITY):
                found["probability"] = _probability(item.MeasuredValueSequence[0])
            elif item.ValueType == "SCOORD" and name == IMAGE_REGION:
                data = [float(v) for v in item.GraphicData]
                found["graphic_type"] = str(item.GraphicType)
                found["graphic_data"] = list(zip(data[0::2], data[1::2], strict=True))
                ref = item.ContentSequence[0].ReferencedSOPSequence[0]
                found["referenced_sop_instance_uid"] = str(ref.ReferencedSOPInstanceUID)
                frames = ref.get("ReferencedFrameNumber")
                if frames is not None:
                    found["referenced_frame_numbers"] = [int(f) for f in np.atleast_1d(frames)]
            elif item.ValueType == "TEXT" and name == COMMENT:
                found["comment"] = str(item.TextValue)
        findings.append(found)
    return findings


def _probability(value: Dataset) -> float:
    """A probability NUM as a fraction: ours are in percent, older ones unitless."""
    number = float(value.NumericValue)
    unit = value.MeasurementUnitsCodeSequence[0]
    return number / 100.0 if str(unit.CodeValue) == sr_codes.PERCENT.value else number
