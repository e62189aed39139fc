"""What the three SR builders and the reader share: series descriptions, the TID 1500
concepts we read and rewrite, the algorithm's identity, image regions, small accessors.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_io import codes as sr_codes
from dicom_io.identity import SOFTWARE_VERSION as SOFTWARE_VERSION
from model.results import (
    AlgorithmInfo,
    CodedConcept,
    ImageLocation,
)

AI_RESULT_SERIES_DESCRIPTION = "AI RESULT - NOT VERIFIED"
AI_NOT_RUN_SERIES_DESCRIPTION = "AI NOT RUN - NO AI RESULT"
VERIFIED_SERIES_DESCRIPTION = "AI RESULT - REVIEWED"


# Concept names of the TID 1500 items we read and rewrite, as (value, scheme).
IMAGING_MEASUREMENTS = ("126010", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")
FINDING = ("121071", "DCM")
FINDING_SITE = ("363698007", "SCT")
IMAGE_REGION = ("111030", "DCM")
# A volumetric group's (TID 1411) segment, and the series it was made from.
REFERENCED_SEGMENT = ("121191", "DCM")
SEGMENTATION_SERIES = ("121232", "DCM")  # Source series for segmentation
COMMENT = ("121106", "DCM")
PIXEL_ROWS = hd.sr.CodedConcept.from_code(codes.DCM.PixelDataRows)
PIXEL_COLUMNS = hd.sr.CodedConcept.from_code(codes.DCM.PixelDataColumns)
PRESENT_KEY = (sr_codes.PRESENT.value, sr_codes.PRESENT.scheme_designator)
ABSENT_KEY = (sr_codes.ABSENT.value, sr_codes.ABSENT.scheme_designator)


def finding_tracking_uid(study_instance_uid: str, device_uid: str, label: str) -> str:
    """The Tracking UID of one finding of one model on one study.

    Derived, not random: a re-run of the same model on the same study reports
    the same finding under the same UID (what Tracking UIDs are for), and the
    saliency SEG's segment carries it too, which links SEG and SR.
    """
    return generate_uid(
        entropy_srcs=["secondreader-finding", study_instance_uid, device_uid, label]
    )


def algorithm_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """The algorithm's item of the Contributing Equipment Sequence (IHE AIR)."""
    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_description=f"AI algorithm {algorithm.name} {algorithm.version}",
    )
    # highdicom accepts only the purposes CID 7005 lists, and has no argument
    # for the Device UID; IHE AIR asks for its own purpose code (one item only)
    # and for the Device UID, which changes whenever the weights change.
    equipment.PurposeOfReferenceCodeSequence = [sr_codes.PROCESSING_ALGORITHM]
    equipment.DeviceUID = algorithm.device_uid
    return equipment


def device_observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm.device_uid,
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        # TID 1004 has no version item; the model name carries it so that a
        # reader of the document alone knows which version spoke.
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def image_region(location: ImageLocation) -> hd.sr.ImageRegion:
    """The Image Region (SCOORD) of a location: its box as a closed polyline, else its point."""
    if location.box is not None:
        c0, r0, c1, r1 = location.box
        # A closed POLYLINE repeats its first point (PS3.3 C.18.6.1.2).
        graphic_type = hd.sr.GraphicTypeValues.POLYLINE
        graphic_data = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float)
    else:
        graphic_type = hd.sr.GraphicTypeValues.POINT
        graphic_data = np.array([location.point], dtype=float)
    return hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=graphic_data,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=location.sop_class_uid,
            referenced_sop_instance_uid=location.sop_instance_uid,
            referenced_frame_numbers=(
                [location.frame_number] if location.frame_number is not None else None
            ),
        ),
    )


def inferred_from(region: hd.sr.ImageRegion | hd.sr.ImageRegion3D) -> Dataset:
    """A copy of an Image Region as the INFERRED FROM child of a measurement."""
    item = deepcopy(region)
    item.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    return item


def root_item(sr: Dataset) -> Dataset:
    """A deep copy of the document's root CONTAINER content item."""
    root = Dataset()
    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentTemplateSequence",
        "ContentSequence",
    ):
        if keyword in sr:
            setattr(root, keyword, deepcopy(sr[keyword].value))
    return root


def measurement_groups(root: Dataset) -> list[Dataset]:
    for container in root.get("ContentSequence", []):
        if container.ValueType == "CONTAINER" and concept_name(container) == IMAGING_MEASUREMENTS:
            return [
                g
                for g in container.get("ContentSequence", [])
                if g.ValueType == "CONTAINER" and concept_name(g) == MEASUREMENT_GROUP
            ]
    return []


def check_same_study(headers: Sequence[Dataset], study_instance_uid: str | None) -> list[Dataset]:
    if not headers:
        raise ValueError("no image headers given")
    expected = study_instance_uid or headers[0].StudyInstanceUID
    if any(h.StudyInstanceUID != expected for h in headers):
        raise ValueError("image headers from another study")
    return list(headers)


def text_of(group: Dataset, name: tuple[str, str]) -> str:
    for item in group.ContentSequence:
        if concept_name(item) == name:
            return str(item.UID if item.ValueType == "UIDREF" else item.TextValue)
    raise ValueError(f"measurement group without {name}")


def concept_name(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def code_value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def concept_key(code: hd.sr.CodedConcept) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def coded(code: Dataset) -> CodedConcept:
    return CodedConcept(
        str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)
    )
