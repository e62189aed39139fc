"""Reading a TID 1500 SR's findings back: ours, or as a PACS returns them."""

from __future__ import annotations

from typing import TypedDict, cast

import highdicom as hd
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset

from dicom_io import codes as sr_codes
from dicom_io.sr.content import (
    ABSENT_KEY,
    IMAGE_REGION,
    PRESENT_KEY,
    REFERENCED_SEGMENT,
    concept_key,
    concept_name,
    measurement_groups,
)
from model.results import (
    CodedConcept,
)

IMAGE_REGION_NAME = hd.sr.CodedConcept("111030", "DCM", "Image Region")


class SRFinding(TypedDict):
    """One measurement group of a TID 1500 SR, as `read_findings` returns it."""

    tracking_identifier: str | None
    tracking_uid: str | None
    finding_type: CodedConcept | None
    finding_site: CodedConcept | None
    laterality: str | None  # "L" or "R": the finding site's Laterality modifier
    present: bool | None  # qualitative evaluation Present / Absent
    probability: float | None
    referenced_sop_instance_uid: str | None  # image of the SCOORD, if any
    referenced_frame_numbers: list[int] | None
    graphic_type: str | None
    graphic_data: list[tuple[float, float]] | None  # (column, row)
    comment: str | None  # the label: the AI's sentence, or the reviewer's (verified SR)
    # A volumetric group (TID 1411): the SEG and segment it measured, and its volume.
    segmentation_sop_instance_uid: str | None
    segment_number: int | None
    volume_ml: float | None


def read_findings(sr: Dataset) -> list[SRFinding]:
    """The measurement groups of a TID 1500 SR, one record per finding, in document order.

    Works on what we write and on what comes back from a PACS: each group is
    read through highdicom's TID 1410 class (a group with an Image Region) or
    TID 1501 class (one without). An SR without an Imaging Measurements
    container (e.g. the not-run SR) gives [].
    """
    findings = []
    for group in measurement_groups(sr):
        located = any(
            item.ValueType == "SCOORD" and concept_name(item) == IMAGE_REGION
            for item in group.ContentSequence
        )
        volumetric = any(item.ValueType == "IMAGE" and concept_name(item) == REFERENCED_SEGMENT
                         for item in group.ContentSequence)  # fmt: skip
        template: type[hd.sr.MeasurementsAndQualitativeEvaluations] | type[
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        ] | type[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = (
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
            if volumetric
            else hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
            if located
            else hd.sr.MeasurementsAndQualitativeEvaluations
        )
        read = template.from_sequence([group])
        finding_type = read.finding_type
        sites = read.finding_sites
        # A CODE item's value: highdicom annotates it as a number.
        codes = [cast(hd.sr.CodedConcept, e.value) for e in read.get_qualitative_evaluations()]
        evaluations = [c for c in codes if concept_key(c) in (PRESENT_KEY, ABSENT_KEY)]
        probability = read.get_measurements(name=sr_codes.PROBABILITY)
        comments = find_content_items(read[0], name=sr_codes.COMMENT, value_type="TEXT")
        found = SRFinding(
            tracking_identifier=read.tracking_identifier,
            tracking_uid=None if read.tracking_uid is None else str(read.tracking_uid),
            finding_type=None if finding_type is None else _plain(finding_type),
            finding_site=_plain(sites[0].value) if sites else None,
            laterality=_side(sites[0].laterality) if sites else None,
            present=concept_key(evaluations[0]) == PRESENT_KEY if evaluations else None,
            probability=_probability(probability[0]) if probability else None,
            referenced_sop_instance_uid=None,
            referenced_frame_numbers=None,
            graphic_type=None,
            graphic_data=None,
            comment=str(comments[0].value) if comments else None,
            segmentation_sop_instance_uid=None,
            segment_number=None,
            volume_ml=None,
        )
        region = None
        if isinstance(read, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
            region = read.roi
        elif isinstance(read, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
            segment = read.referenced_segment
            if segment is not None:
                found["segmentation_sop_instance_uid"] = segment.referenced_sop_instance_uid
                numbers = segment.referenced_segment_numbers
                found["segment_number"] = int(numbers[0]) if numbers else None
            volume = read.get_measurements(name=sr_codes.VOLUME)
            found["volume_ml"] = float(volume[0].value) if volume else None
            # The key image's region, which each NUM says it was INFERRED FROM.
            inferred = find_content_items(probability[0][0], name=IMAGE_REGION_NAME,
                                          value_type="SCOORD") if probability else []
            region = hd.sr.ImageRegion.from_dataset(inferred[0]) if inferred else None
        if isinstance(region, hd.sr.ImageRegion):
            found["graphic_type"] = region.graphic_type.value
            found["graphic_data"] = [(float(c), float(r)) for c, r in region.value]
            source = region.ContentSequence[0]
            found["referenced_sop_instance_uid"] = str(source.referenced_sop_instance_uid)
            frames = source.referenced_frame_numbers
            if frames is not None:
                found["referenced_frame_numbers"] = [int(f) for f in frames]
        findings.append(found)
    return findings


def _side(code: hd.sr.CodedConcept | None) -> str | None:
    if code is None:
        return None
    for side, concept in sr_codes.LATERALITY.items():
        if concept_key(concept) == concept_key(code):
            return side
    return None


def _probability(measurement: hd.sr.Measurement) -> float:
    """A probability NUM as a fraction: ours are in percent, older ones unitless."""
    number = float(measurement.value)
    return number / 100.0 if measurement.unit.value == sr_codes.PERCENT.value else number


def _plain(code: hd.sr.CodedConcept) -> CodedConcept:
    return CodedConcept(str(code.value), str(code.scheme_designator), str(code.meaning))
