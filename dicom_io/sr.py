"""The AI result as DICOM Structured Reports the PACS stores and viewers show.

Three documents, all Comprehensive 3D SR in the study of their images, each in
a new series:

* `build_ai_result_sr`: TID 1500 Measurement Report, one measurement group per
  finding, marked PRELIMINARY / UNVERIFIED (the radiologist has not seen it);
* `build_not_run_sr`: says the AI did not analyse the study and why, so that a
  missing result never reads as "no finding";
* `build_verified_sr`: the physician's review of an AI SR, VERIFIED and FINAL,
  with the AI SR as predecessor.

`read_findings` reads the findings back (tests, Orthanc round trips, review).
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from importlib import metadata
from typing import Any, NamedTuple, TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_io import codes as sr_codes
from dicom_io.wording import finding_label, reviewed_label
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
)

AI_RESULT_SERIES_DESCRIPTION = "AI RESULT - NOT VERIFIED"
AI_NOT_RUN_SERIES_DESCRIPTION = "AI NOT RUN - NO AI RESULT"
VERIFIED_SERIES_DESCRIPTION = "AI RESULT - REVIEWED"

try:
    SOFTWARE_VERSION = metadata.version("secondreader")
except metadata.PackageNotFoundError:  # running from a checkout that is not installed
    SOFTWARE_VERSION = "unknown"

# Concept names of the TID 1500 items we read and rewrite, as (value, scheme).
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")
_FINDING = ("121071", "DCM")
_FINDING_SITE = ("363698007", "SCT")
_IMAGE_REGION = ("111030", "DCM")
_COMMENT = ("121106", "DCM")
_PIXEL_ROWS = hd.sr.CodedConcept.from_code(codes.DCM.PixelDataRows)
_PIXEL_COLUMNS = hd.sr.CodedConcept.from_code(codes.DCM.PixelDataColumns)
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")  # an Image Library entry
_PRESENT = (sr_codes.PRESENT.value, sr_codes.PRESENT.scheme_designator)
_ABSENT = (sr_codes.ABSENT.value, sr_codes.ABSENT.scheme_designator)


class ReviewDecision(NamedTuple):
    """A physician's decision on one AI finding (a plain 3-tuple works too).

    A correction is `confirmed` with a `corrected_location`: the finding is
    there, at the place the physician gives.
    """

    tracking_uid: str
    confirmed: bool
    comment: str | None = None
    corrected_location: ImageLocation | None = None


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


def finding_tracking_uid(study_instance_uid: str, device_uid: str, label: str) -> str:
    """The Tracking UID of one finding of one model on one study.

    Derived, not random: a re-run of the same model on the same study reports
    the same finding under the same UID (what Tracking UIDs are for), and the
    saliency SEG's segment carries it too, which links SEG and SR.
    """
    return generate_uid(
        entropy_srcs=["secondreader-finding", study_instance_uid, device_uid, label]
    )


def build_ai_result_sr(
    result: AnalysisResult,
    source_headers: Sequence[Dataset],
    *,
    series_number: int,
    series_description: str = AI_RESULT_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "secondreader",
    manufacturer_model_name: str = "secondreader",
    software_versions: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    predecessor: Dataset | None = None,
    segmentation: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The AI result of one analysed series as a TID 1500 Measurement Report.

    `source_headers` are the analysed images (pixel data not needed): they
    form the Image Library (full descriptors for the findings' key images only) and the
    evidence. `predecessor` is an earlier SR of
    this study that the new one supersedes (a re-run). `segmentation` is the
    saliency SEG made for this result, recorded as evidence (see below).
    """
    if result.outcome != Outcome.ANALYSED:
        raise ValueError(f"outcome is {result.outcome}: use build_not_run_sr")
    if result.algorithm is None:
        raise ValueError("an analysed result needs its algorithm")
    if not result.findings:
        raise ValueError("an analysed result needs at least one finding")
    headers = _check_same_study(source_headers, result.study_instance_uid)
    by_uid = {h.SOPInstanceUID: h for h in headers}
    for finding in result.findings:
        if finding.location and finding.location.sop_instance_uid not in by_uid:
            raise ValueError(f"finding {finding.label!r} points at an image not in source_headers")
    for name, extra in (("predecessor", predecessor), ("segmentation", segmentation)):
        if extra is not None and extra.StudyInstanceUID != result.study_instance_uid:
            raise ValueError(f"{name} belongs to another study")

    algorithm = result.algorithm
    modality = str(headers[0].Modality)
    report = hd.sr.MeasurementReport(
        observation_context=_device_observation_context(algorithm),
        procedure_reported=sr_codes.procedure_for_modality(modality),
        imaging_measurements=[
            _measurement_group(result.study_instance_uid, algorithm, f, _region_of(f, by_uid))
            for f in result.findings
        ],
    )
    key_images = {f.location.sop_instance_uid for f in result.findings if f.location}
    # TID 1500 order: the library comes right before Imaging Measurements.
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, _image_library(headers, key_images))
    # The SEG goes to the evidence (Current Requested Procedure Evidence), not
    # into the groups: TID 1410 takes either an Image Region (SCOORD) or a
    # Referenced Segment, and OHIF draws only SCOORD. The segment shares the
    # finding's Tracking UID, which ties each group to its saliency segment.
    evidence = [*headers, *([segmentation] if segmentation is not None else [])]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        series_description=series_description,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        # Every label of the model is reported: the content is complete; the
        # document is still preliminary and unverified until a human reviews it.
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(algorithm)],
        coding_schemes=[sr_codes.IHE_SCHEME_ITEM],
    )


def build_not_run_sr(
    study_headers: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo | None,
    *,
    outcome: Outcome,
    series_number: int,
    series_description: str = AI_NOT_RUN_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "secondreader",
    manufacturer_model_name: str = "secondreader",
    software_versions: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A short SR saying that no AI result exists for the study, and why.

    Not a TID 1500 report: there is nothing measured. The title ("AI analysis
    not performed") and a plain-text summary are what any SR viewer shows.
    `study_headers` are images of the study (all of them or a few): they give
    patient and study and are listed as evidence.
    """
    if outcome == Outcome.ANALYSED:
        raise ValueError("an analysed result goes in build_ai_result_sr")
    if not reason.strip():
        raise ValueError("say why the AI did not run")
    headers = _check_same_study(study_headers, None)
    root = hd.sr.ContainerContentItem(name=sr_codes.AI_NOT_PERFORMED)
    items: list[hd.sr.ContentItem] = []
    if algorithm is not None:
        items.extend(_device_observation_context(algorithm))
    items.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=sr_codes.procedure_for_modality(str(headers[0].Modality)),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    outcome_code = {
        Outcome.FAILED_QC: sr_codes.OUTCOME_FAILED_QC,
        Outcome.FAILED: sr_codes.OUTCOME_FAILED,
    }.get(outcome, sr_codes.OUTCOME_NOT_APPLICABLE)
    items.append(
        hd.sr.CodeContentItem(
            name=sr_codes.AI_OUTCOME,
            value=outcome_code,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=sr_codes.SUMMARY,
            value=(
                "AI analysis was NOT performed on this study. No AI result exists: "
                "the absence of AI findings does not mean the study is negative."
            ),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=sr_codes.COMMENT,
            value=f"Reason: {reason.strip()}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=root,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        series_description=series_description,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        # PARTIAL: the analysis the study was sent for is absent, so nothing
        # that filters on COMPLETE can mistake this for a full AI report.
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(algorithm)] if algorithm else None,
        coding_schemes=[sr_codes.PRIVATE_SCHEME_ITEM, sr_codes.IHE_SCHEME_ITEM],
    )


def build_verified_sr(
    ai_sr: Dataset,
    decisions: Sequence[ReviewDecision | tuple[str, bool, str | None]],
    *,
    verifying_observer_name: str,
    verifying_organization: str,
    series_number: int,
    series_description: str = VERIFIED_SERIES_DESCRIPTION,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    manufacturer: str = "secondreader",
    manufacturer_model_name: str = "secondreader",
    software_versions: str = SOFTWARE_VERSION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    supersedes: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The physician's review of an AI SR: VERIFIED, FINAL, AI SR as predecessor.

    An amendment passes the verified SR it `supersedes`: that one becomes the
    predecessor; the findings are still read from the AI SR.

    Every finding of `ai_sr` needs a decision (a verified document must not
    attest findings nobody looked at). A confirmed finding is copied as is; a
    rejected one gets the opposite qualitative evaluation, "REJECTED" in its
    tracking identifier and, if it had one, its whole key image as its region
    instead of the AI's spot, so that no viewer draws a mark the physician
    rejected, and OHIF, which needs a region in every group, still opens it
    (as for the AI SR's absent findings: `_region_of`). Each group gets a
    Comment text with the decision. Tracking UIDs are kept: they name the
    same findings.
    """
    by_uid = {str(d[0]): ReviewDecision(str(d[0]), bool(d[1]), *d[2:]) for d in decisions}
    root = _root_item(ai_sr)
    groups = _measurement_groups(root)
    if not groups:
        raise ValueError("the SR has no AI findings to review (not a TID 1500 AI result?)")
    uids = [_text_of(g, _TRACKING_UID) for g in groups]
    missing = [u for u in uids if u not in by_uid]
    unknown = sorted(set(by_uid) - set(uids))
    if missing or unknown:
        raise ValueError(
            f"decisions do not match the findings: missing {missing}, unknown {unknown}"
        )

    person = hd.sr.ObserverContext(
        observer_type=codes.cid270.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=verifying_observer_name, organization_name=verifying_organization
        ),
    )
    # The reviewer observes first (TID 1001); the device observer stays, since
    # the measurements are still the algorithm's.
    first_context = next(
        (
            i
            for i, item in enumerate(root.ContentSequence)
            if item.RelationshipType == "HAS OBS CONTEXT"
        ),
        1,  # after the language item
    )
    for offset, item in enumerate(person):
        root.ContentSequence.insert(first_context + offset, item)
    sizes = _image_sizes(root)
    for group, uid in zip(groups, uids, strict=True):
        _apply_decision(group, by_uid[uid], sizes)

    sr = hd.sr.Comprehensive3DSR(
        evidence=_evidence_stand_ins(ai_sr),
        content=root,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        series_description=series_description,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=verifying_observer_name,
        verifying_organization=verifying_organization,
        previous_versions=[supersedes if supersedes is not None else ai_sr],
        coding_schemes=[sr_codes.IHE_SCHEME_ITEM],
    )
    # The stand-ins carry only the identifying attributes; take the rest of
    # patient and study (description, age, ...) from the AI SR itself.
    sr.copy_patient_and_study_information(ai_sr)
    # The findings are still the algorithm's: keep the AI SR's equipment list
    # (acquisition, algorithm with its Device UID, highdicom) as it was.
    sr.ContributingEquipmentSequence = deepcopy(ai_sr.ContributingEquipmentSequence)
    return sr


def read_findings(sr: Dataset) -> list[SRFinding]:
    """The measurement groups of a TID 1500 SR, one record per finding.

    Works on what we write and on what comes back from a PACS (plain pydicom
    datasets, no highdicom parsing). An SR without an Imaging Measurements
    container (e.g. the not-run SR) gives [].
    """
    findings = []
    for group in _measurement_groups(sr):
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
            name = _concept(item)
            if name == _TRACKING_IDENTIFIER:
                found["tracking_identifier"] = str(item.TextValue)
            elif name == _TRACKING_UID:
                found["tracking_uid"] = str(item.UID)
            elif name == _FINDING:
                found["finding_type"] = _coded(item.ConceptCodeSequence[0])
            elif name == _FINDING_SITE:
                found["finding_site"] = _coded(item.ConceptCodeSequence[0])
            elif item.ValueType == "CODE" and _code_value(item) in (_PRESENT, _ABSENT):
                found["present"] = _code_value(item) == _PRESENT
            elif item.ValueType == "NUM" and name == _key(sr_codes.PROBABILITY):
                found["probability"] = _probability(item.MeasuredValueSequence[0])
            elif item.ValueType == "SCOORD" and name == _IMAGE_REGION:
                data = [float(v) for v in item.GraphicData]
                found["graphic_type"] = str(item.GraphicType)
                found["graphic_data"] = list(zip(data[0::2], data[1::2], strict=True))
                ref = item.ContentSequence[0].ReferencedSOPSequence[0]
                found["referenced_sop_instance_uid"] = str(ref.ReferencedSOPInstanceUID)
                frames = ref.get("ReferencedFrameNumber")
                if frames is not None:
                    found["referenced_frame_numbers"] = [int(f) for f in np.atleast_1d(frames)]
            elif item.ValueType == "TEXT" and name == _COMMENT:
                found["comment"] = str(item.TextValue)
        findings.append(found)
    return findings


def _probability(value: Dataset) -> float:
    """A probability NUM as a fraction: ours are in percent, older ones unitless."""
    number = float(value.NumericValue)
    unit = value.MeasurementUnitsCodeSequence[0]
    return number / 100.0 if str(unit.CodeValue) == sr_codes.PERCENT.value else number


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


def _device_observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
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


def _region_of(finding: Finding, headers: dict[str, Dataset]) -> ImageLocation | None:
    """The region a finding's group draws: its box or point; if absent, its whole key image.

    OHIF 3.13.2 needs an image region in every measurement group of a TID
    1500 report: a group without one stops its SR viewport with
    "Cannot read properties of undefined (reading 'ReferencedSOPSequence')"
    (`_checkIfCanAddMeasurementsToDisplaySet` reads `coords[0]`), and a
    report with no group at all stops it in `_getViewportReferencedDisplaySetData`.
    A box around the spot of an absent finding would be a cue to look for
    something the AI says is not there; the whole key image (the slice whose
    probability the group reports) points at no spot. A finding without a
    location (a model that gives no saliency) gets no region.
    """
    location = finding.location
    if location is None or finding.present:
        return location
    image = headers[location.sop_instance_uid]
    whole = (0.0, 0.0, float(image.Columns), float(image.Rows))
    centre = (whole[2] / 2, whole[3] / 2)
    return ImageLocation(
        location.sop_instance_uid, location.sop_class_uid, centre, whole, location.frame_number
    )


def _measurement_group(
    study_instance_uid: str,
    algorithm: AlgorithmInfo,
    finding: Finding,
    location: ImageLocation | None,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """One finding's group: TID 1410 with `location` as its region, TID 1501 without one."""
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        # The threshold explains Present/Absent to whoever reads the number;
        # the finding's own threshold wins over a model-wide one of that name.
        parameters=[f"{k}={v}" for k, v in algorithm.parameters.items() if k != "threshold"]
        + [f"threshold={finding.threshold:g}"],
        family=codes.DCM.ArtificialIntelligence,
    )
    finding_type = sr_codes.to_hd(finding.finding_type)
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=finding_tracking_uid(study_instance_uid, algorithm.device_uid, finding.label),
            identifier=f"AI {finding.label}",
        ),
        "finding_type": finding_type,
        "algorithm_id": algorithm_id,
        "finding_sites": [hd.sr.FindingSite(sr_codes.to_hd(finding.finding_site))],
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(
                finding_type, sr_codes.PRESENT if finding.present else sr_codes.ABSENT
            )
        ],
    }
    located = location is not None
    probability = hd.sr.Measurement(
        name=sr_codes.PROBABILITY,
        value=100.0 * float(finding.probability),
        unit=sr_codes.PERCENT,
        # The group names the algorithm already. Inside a NUM without a
        # region it would only make OHIF look there for one in vain
        # ("ContentSequence array contains no SCOORD ... skipping").
        algorithm_id=algorithm_id if located else None,
    )
    # A finding without a location: a TID 1501 group that still carries type,
    # site, probability and Present/Absent (OHIF cannot show it: `_region_of`).
    group: hd.sr.Template
    if location is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(measurements=[probability], **common)
    else:
        # The region twice: as the group's Image Region (TID 1410), and as
        # what the probability was INFERRED FROM (TID 300). The cornerstone
        # adapters OHIF uses look for the SCOORD of a group that has a NUM
        # only inside that NUM; without it OHIF draws the region but never
        # makes it a measurement ("No spatial coordinates group found").
        # (highdicom refuses the child in a planar ROI group's measurements,
        # so it is added to the built group.)
        region = _region(location)
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=region, measurements=[probability], **common
        )
        for item in group[0].ContentSequence:
            if item.ValueType == "NUM":
                item.ContentSequence = [*item.get("ContentSequence", []), _inferred_from(region)]
    # OHIF takes the measurement's label from the group's Comment (TID 1501
    # has none of its own, but a TEXT in a group is what viewers read).
    container = group[0]
    container.ContentSequence.append(
        hd.sr.TextContentItem(
            name=sr_codes.COMMENT,
            value=finding_label(finding, algorithm),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def _inferred_from(region: hd.sr.ImageRegion) -> Dataset:
    """A copy of an Image Region as the INFERRED FROM child of a measurement."""
    item = deepcopy(region)
    item.RelationshipType = hd.sr.RelationshipTypeValues.INFERRED_FROM.value
    return item


def _region(location: ImageLocation) -> hd.sr.ImageRegion:
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


def _image_library(headers: Sequence[Dataset], described: set[str]) -> hd.sr.ContentItem:
    """TID 1600 Image Library of every analysed image.

    highdicom's ImageLibrary gives each image 16 descriptor items: for a
    300-slice CT that is 5 s of build time, a 1.2 MB SR, and thousands of
    lines a text rendering shows before the findings. The descriptors (TID
    1602) are optional, so only the images a finding points at get them; the
    others are listed bare, grouped by frame of reference as highdicom does.
    """
    groups: dict[str | None, list[hd.sr.ContentItem]] = {}
    for header in headers:
        if "Rows" not in header:  # not an image (an SR, a KO...): evidence only
            continue
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        if header.SOPInstanceUID in described:
            descriptors = hd.sr.ImageLibraryEntryDescriptors(_library_view(header))
            image.ContentSequence = hd.sr.ContentSequence(list(descriptors))
        groups.setdefault(header.get("FrameOfReferenceUID"), []).append(image)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library_groups = []
    for frame_of_reference, images in groups.items():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        shared: list[hd.sr.ContentItem] = []
        if frame_of_reference is not None:
            shared.append(
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.FrameOfReferenceUID,
                    value=frame_of_reference,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        group.ContentSequence = hd.sr.ContentSequence([*shared, *images])
        library_groups.append(group)
    library.ContentSequence = hd.sr.ContentSequence(library_groups)
    return library


# What highdicom's Image Library descriptors (TID 1603/1604) read from a header,
# by the modalities it treats as cross-sectional or projection.
_CROSS_SECTIONAL = ("CT", "MR", "PT")
_CROSS_SECTIONAL_NEEDS = (
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
)  # fmt: skip
_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
_PROJECTION_NEEDS = ("PatientOrientation", "ImagerPixelSpacing")


def _library_view(header: Dataset) -> Dataset:
    """The header as highdicom's Image Library can describe it.

    highdicom assumes the modality-specific descriptors (all optional in TID
    1602) exist and fails otherwise: real CRs often lack Imager Pixel Spacing,
    enhanced CTs keep spacing in functional groups. Such images get an entry
    with the generic descriptors only (modality, frame of reference, size).
    """
    modality = header.get("Modality", "")
    if modality in _CROSS_SECTIONAL:
        needs: tuple[str, ...] = _CROSS_SECTIONAL_NEEDS
    elif modality in _PROJECTION:
        needs = _PROJECTION_NEEDS
    else:
        return header
    if all(header.get(k) not in (None, "") for k in needs) and (
        modality not in _PROJECTION or len(header.PatientOrientation) == 2
    ):
        return header
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in header:
            setattr(view, keyword, header[keyword].value)
    view.Modality = "OT"  # read only by highdicom to pick the descriptor set
    return view


def _apply_decision(
    group: Dataset, decision: ReviewDecision, sizes: dict[str, tuple[int, int]]
) -> None:
    """Rewrite one copied measurement group with the reviewer's decision."""
    items = list(group.ContentSequence)
    if decision.corrected_location is not None:
        _apply_correction(group, items, decision)
        return
    if not decision.confirmed:
        for item in items:
            if _concept(item) == _TRACKING_IDENTIFIER:
                item.TextValue = f"{item.TextValue} - REJECTED BY REVIEWER"
            elif item.ValueType == "CODE" and _code_value(item) in (_PRESENT, _ABSENT):
                flipped = sr_codes.ABSENT if _code_value(item) == _PRESENT else sr_codes.PRESENT
                item.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(flipped)]
        whole = _whole_key_image(items, sizes)
        items = _without_regions(items)
        if whole is not None:
            items = _with_region(items, whole)
        elif "ContentTemplateSequence" in group:
            # Without a region the group is a TID 1501 group, and says so.
            group.ContentTemplateSequence[0].TemplateIdentifier = "1501"
    verdict = "confirmed" if decision.confirmed else "rejected"
    items = _with_review_comment(items, f"Reviewer {verdict} the AI finding.", decision.comment)
    group.ContentSequence = items


def _with_region(items: list[Dataset], location: ImageLocation) -> list[Dataset]:
    """The group's items with `location` as its Image Region, which the probability NUM
    also points at, so that OHIF tracks it (see _measurement_group)."""
    region = _region(location)
    for item in items:
        if item.ValueType == "NUM" and _concept(item) == _key(sr_codes.PROBABILITY):
            item.ContentSequence = [*item.get("ContentSequence", []), _inferred_from(region)]
    return [*items, region]


def _whole_key_image(
    items: list[Dataset], sizes: dict[str, tuple[int, int]]
) -> ImageLocation | None:
    """The whole image the group's region is on, or None (no region, or its size unknown)."""
    for item in items:
        if item.ValueType == "SCOORD" and _concept(item) == _IMAGE_REGION:
            ref = item.ContentSequence[0].ReferencedSOPSequence[0]
            uid = str(ref.ReferencedSOPInstanceUID)
            if uid not in sizes:
                return None
            columns, rows = sizes[uid]
            frames = ref.get("ReferencedFrameNumber")
            return ImageLocation(
                uid, str(ref.ReferencedSOPClassUID), (columns / 2, rows / 2),
                (0.0, 0.0, float(columns), float(rows)), int(frames) if frames else None,
            )  # fmt: skip
    return None


def _image_sizes(root: Dataset) -> dict[str, tuple[int, int]]:
    """(columns, rows) of each image the Image Library describes (the findings' key images)."""
    sizes: dict[str, tuple[int, int]] = {}
    stack = list(root.ContentSequence)
    while stack:
        item = stack.pop()
        children = list(item.get("ContentSequence", []))
        if item.ValueType == "IMAGE" and children:
            values = {_concept(c): c.MeasuredValueSequence[0].NumericValue
                      for c in children if c.ValueType == "NUM"}  # fmt: skip
            rows, columns = values.get(_key(_PIXEL_ROWS)), values.get(_key(_PIXEL_COLUMNS))
            if rows is not None and columns is not None:
                uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                sizes[uid] = (int(columns), int(rows))
        stack.extend(children)
    return sizes


def _without_regions(items: list[Dataset]) -> list[Dataset]:
    """The group's items without its Image Region, and its NUMs without theirs."""
    kept = []
    for item in items:
        if item.ValueType == "SCOORD" and _concept(item) == _IMAGE_REGION:
            continue
        if item.ValueType == "NUM" and "ContentSequence" in item:
            children = [c for c in item.ContentSequence if c.ValueType != "SCOORD"]
            if children:
                item.ContentSequence = children
            else:
                del item.ContentSequence
        kept.append(item)
    return kept


def _with_review_comment(items: list[Dataset], verdict: str, comment: str | None) -> list[Dataset]:
    """Replace the AI's label (a Comment saying NOT VERIFIED) with the reviewer's.

    The label OHIF shows is the group's first Comment: after review it must
    say what the physician decided, not that nobody has looked.
    """
    ai_label = next(
        (str(i.TextValue) for i in items if i.ValueType == "TEXT" and _concept(i) == _COMMENT),
        None,
    )
    kept = [i for i in items if not (i.ValueType == "TEXT" and _concept(i) == _COMMENT)]
    text = verdict
    if ai_label:
        text += f" ({reviewed_label(ai_label)})"
    if comment:
        text += f" {comment.strip()}"
    kept.append(hd.sr.TextContentItem(sr_codes.COMMENT, text, relationship_type="CONTAINS"))
    return kept


def _apply_correction(group: Dataset, items: list[Dataset], decision: ReviewDecision) -> None:
    """The finding is there, at the physician's location: new region, Present."""
    assert decision.corrected_location is not None
    for item in items:
        if _concept(item) == _TRACKING_IDENTIFIER:
            item.TextValue = f"{item.TextValue} - LOCATION CORRECTED BY REVIEWER"
        elif item.ValueType == "CODE" and _code_value(item) == _ABSENT:
            item.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(sr_codes.PRESENT)]
    items = _with_region(_without_regions(items), decision.corrected_location)
    if "ContentTemplateSequence" in group:
        group.ContentTemplateSequence[0].TemplateIdentifier = "1410"
    items = _with_review_comment(
        items, "Reviewer corrected the location of the AI finding.", decision.comment
    )
    group.ContentSequence = items


def _evidence_stand_ins(ai_sr: Dataset) -> list[Dataset]:
    """Minimal datasets for the instances the AI SR lists as evidence.

    highdicom takes patient and study from the first evidence dataset and
    checks that every instance the content references is evidence; the
    reviewer's SR has the AI SR only, not the images, so stand-ins built from
    its evidence sequence (with the AI SR's patient and study) do both jobs.
    """
    study_attrs = (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
        "SpecificCharacterSet",
    )  # fmt: skip
    stand_ins = []
    for series in ai_sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for ref in series.ReferencedSeriesSequence:
            for inst in ref.ReferencedSOPSequence:
                ds = Dataset()
                for keyword in study_attrs:
                    if keyword in ai_sr:
                        setattr(ds, keyword, ai_sr[keyword].value)
                ds.StudyInstanceUID = series.StudyInstanceUID
                ds.SeriesInstanceUID = ref.SeriesInstanceUID
                ds.SOPClassUID = inst.ReferencedSOPClassUID
                ds.SOPInstanceUID = inst.ReferencedSOPInstanceUID
                stand_ins.append(ds)
    if not stand_ins:
        raise ValueError("the AI SR lists no evidence")
    return stand_ins


def _root_item(sr: Dataset) -> Dataset:
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


def _measurement_groups(root: Dataset) -> list[Dataset]:
    for container in root.get("ContentSequence", []):
        if container.ValueType == "CONTAINER" and _concept(container) == _IMAGING_MEASUREMENTS:
            return [
                g
                for g in container.get("ContentSequence", [])
                if g.ValueType == "CONTAINER" and _concept(g) == _MEASUREMENT_GROUP
            ]
    return []


def _check_same_study(headers: Sequence[Dataset], study_instance_uid: str | None) -> list[Dataset]:
    if not headers:
        raise ValueError("no image headers given")
    expected = study_instance_uid or headers[0].StudyInstanceUID
    if any(h.StudyInstanceUID != expected for h in headers):
        raise ValueError("image headers from another study")
    return list(headers)


def _text_of(group: Dataset, name: tuple[str, str]) -> str:
    for item in group.ContentSequence:
        if _concept(item) == name:
            return str(item.UID if item.ValueType == "UIDREF" else item.TextValue)
    raise ValueError(f"measurement group without {name}")


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _code_value(item: Dataset) -> tuple[str, str]:
    code = item.ConceptCodeSequence[0]
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _key(code: hd.sr.CodedConcept) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def _coded(code: Dataset) -> CodedConcept:
    return CodedConcept(
        str(code.CodeValue), str(code.CodingSchemeDesignator), str(code.CodeMeaning)
    )
