"""The AI result: a TID 1500 Measurement Report, PRELIMINARY and UNVERIFIED."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Unpack, cast

import highdicom as hd
import numpy as np
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io import codes as sr_codes
from dicom_io.identity import NewObject, identity
from dicom_io.sr.content import (
    AI_RESULT_SERIES_DESCRIPTION,
    algorithm_equipment,
    check_same_study,
    device_observation_context,
    finding_tracking_uid,
    image_region,
    inferred_from,
)
from dicom_io.wording import finding_label
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    Finding,
    ImageLocation,
    Outcome,
    segmented,
)

_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")  # an Image Library entry


def build_ai_result_sr(
    result: AnalysisResult,
    source_headers: Sequence[Dataset],
    *,
    series_description: str = AI_RESULT_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    predecessor: Dataset | None = None,
    segmentation: Dataset | None = None,
    regions: Dataset | None = None,
    **new: Unpack[NewObject],
) -> hd.sr.Comprehensive3DSR:
    """The AI result of one analysed series as a TID 1500 Measurement Report.

    `source_headers` are the analysed images (pixel data not needed): they
    form the Image Library (full descriptors for the findings' key images only) and the
    evidence. `predecessor` is an earlier SR of
    this study that the new one supersedes (a re-run). `segmentation` is the
    saliency SEG made for this result, recorded as evidence (see below).
    `regions` is a segmentation model's SEG of its regions
    (`build_segmentation_seg`): each measured finding is then a TID 1411
    volumetric group that references its segment; without it, a planar group
    on the region's key image that still carries the measurements.
    """
    if result.outcome != Outcome.ANALYSED:
        raise ValueError(f"outcome is {result.outcome}: use build_not_run_sr")
    if result.algorithm is None:
        raise ValueError("an analysed result needs its algorithm")
    if not result.findings:
        raise ValueError("an analysed result needs at least one finding")
    headers = check_same_study(source_headers, result.study_instance_uid)
    by_uid = {h.SOPInstanceUID: h for h in headers}
    for finding in result.findings:
        if finding.location and finding.location.sop_instance_uid not in by_uid:
            raise ValueError(f"finding {finding.label!r} points at an image not in source_headers")
    for name, extra in (("predecessor", predecessor), ("segmentation", segmentation),
                        ("regions", regions)):
        if extra is not None and extra.StudyInstanceUID != result.study_instance_uid:
            raise ValueError(f"{name} belongs to another study")

    algorithm = result.algorithm
    modality = str(headers[0].Modality)
    frame_of_reference = headers[0].get("FrameOfReferenceUID")
    segments = {index: number for number, (index, _) in
                enumerate(segmented(result.findings), start=1)} if regions is not None else {}
    report = hd.sr.MeasurementReport(
        observation_context=device_observation_context(algorithm),
        procedure_reported=sr_codes.procedure_for_modality(modality),
        imaging_measurements=[
            _measurement_group(result.study_instance_uid, algorithm, f, _region_of(f, by_uid),
                               modality=modality, frame_of_reference_uid=frame_of_reference,
                               segment=(_segment(regions, segments[i], result)
                                        if regions is not None and i in segments else None))
            for i, f in enumerate(result.findings)
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
    evidence = [*headers, *(extra for extra in (segmentation, regions) if extra is not None)]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        **identity(new),
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


def region_3d(points: tuple[tuple[float, float, float], ...],
              frame_of_reference_uid: str | None) -> hd.sr.ImageRegion3D:  # fmt: skip
    """A 3D model's region: a closed polyline in patient coordinates (SCOORD3D)."""
    if not frame_of_reference_uid:
        raise ValueError("a region in patient coordinates needs the images' frame of reference")
    return hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                               graphic_data=np.asarray(points, dtype=float),
                               frame_of_reference_uid=frame_of_reference_uid)


def _segment(seg: Dataset, number: int, result: AnalysisResult) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        source_series=hd.sr.SourceSeriesForSegmentation(str(result.series_instance_uid)))


def _size_measurements(
    finding: Finding, modality: str, algorithm_id: hd.sr.AlgorithmIdentification | None
) -> list[hd.sr.Measurement]:
    """A lesion's size (and, for a segmented region on CT, its CT numbers) as NUMs."""
    out: list[hd.sr.Measurement] = []
    if finding.volume_ml is not None:
        out.append(hd.sr.Measurement(name=sr_codes.VOLUME, value=float(finding.volume_ml),
                                     unit=sr_codes.MILLILITER, algorithm_id=algorithm_id))
    if finding.diameter_mm is not None:
        # A detector's box: its longer side; a segmented region: its longest
        # diameter in an axial plane, RECIST's long axis.
        name = sr_codes.LONG_AXIS if finding.volume_ml is not None else codes.SCT.Diameter
        out.append(hd.sr.Measurement(name=name, value=float(finding.diameter_mm),
                                     unit=codes.UCUM.Millimeter, algorithm_id=algorithm_id))
    if modality.upper() == "CT":  # other modalities' values have no unit to state
        for derivation, value in ((sr_codes.MEAN, finding.mean_intensity),
                                  (sr_codes.MAXIMUM, finding.max_intensity)):
            if value is not None:
                out.append(hd.sr.Measurement(
                    name=sr_codes.ATTENUATION_COEFFICIENT, value=float(value),
                    unit=sr_codes.HOUNSFIELD_UNIT, derivation=derivation,
                    algorithm_id=algorithm_id))  # fmt: skip
    return out


def _measurement_group(
    study_instance_uid: str,
    algorithm: AlgorithmInfo,
    finding: Finding,
    location: ImageLocation | None,
    *,
    modality: str = "",
    segment: hd.sr.ReferencedSegment | None = None,
    frame_of_reference_uid: str | None = None,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    """One finding's group: TID 1411 referencing `segment`; else TID 1410 with `location`
    as its region; TID 1501 without either."""
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
            uid=finding_tracking_uid(study_instance_uid, algorithm.device_uid, finding.key),
            identifier=f"AI {finding.key}",
        ),
        "finding_type": finding_type,
        "algorithm_id": algorithm_id,
        # The side as TID 1500 says it: a Laterality modifier of the finding site.
        "finding_sites": [hd.sr.FindingSite(
            sr_codes.to_hd(finding.finding_site),
            laterality=sr_codes.LATERALITY.get(finding.laterality or ""),
        )],
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
    measurements = [probability,
                    *_size_measurements(finding, modality, algorithm_id if located else None)]
    # A finding without a location: a TID 1501 group that still carries type,
    # site, probability and Present/Absent (OHIF cannot show it: `_region_of`).
    group: Template
    if location is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(measurements=measurements, **common)
    elif segment is not None:
        # The segment is the region measured. The key image's region goes
        # into each NUM as what it was INFERRED FROM, as in the planar group.
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=segment, measurements=measurements, **common)
        region = image_region(location)
        for item in group[0].ContentSequence:
            if item.ValueType == "NUM":
                item.ContentSequence = [*item.get("ContentSequence", []), inferred_from(region)]
    else:
        # The region twice: as the group's Image Region (TID 1410), and as
        # what the probability was INFERRED FROM (TID 300). The cornerstone
        # adapters OHIF uses look for the SCOORD of a group that has a NUM
        # only inside that NUM; without it OHIF draws the region but never
        # makes it a measurement ("No spatial coordinates group found").
        # (highdicom refuses the child in a planar ROI group's measurements,
        # so it is added to the built group.)
        # A 3D model's region lies in patient coordinates (SCOORD3D).
        planar: hd.sr.ImageRegion | hd.sr.ImageRegion3D = (
            image_region(location) if finding.region_3d is None
            else region_3d(finding.region_3d, frame_of_reference_uid))
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=planar, measurements=measurements, **common
        )
        for item in group[0].ContentSequence:
            if item.ValueType == "NUM":
                item.ContentSequence = [*item.get("ContentSequence", []), inferred_from(planar)]
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


def _image_library(headers: Sequence[Dataset], described: set[str]) -> hd.sr.ContentItem:
    """TID 1600 Image Library: the images the findings point at, each fully described.

    The library is where a reader of the measurements finds the descriptors
    (position, spacing, ...) of the images they are made on; every analysed
    image is listed in the evidence (Current Requested Procedure Evidence
    Sequence). Listing all of them here too cost a 300-slice CT about 0.5 s
    of build and write time, between the last image and the SR reaching
    the PACS, and thousands of lines a text rendering shows before the
    findings. Only when no finding has a location are all images listed
    (bare), so that the library is never empty. Grouped by frame of
    reference, as highdicom does.
    """
    groups: dict[str | None, list[hd.sr.ContentItem]] = {}
    for header in headers:
        if "Rows" not in header:  # not an image (an SR, a KO...): evidence only
            continue
        if described and header.SOPInstanceUID not in described:
            continue
        image = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        if header.SOPInstanceUID in described:
            descriptors = hd.sr.ImageLibraryEntryDescriptors(_library_view(header))
            image.ContentSequence = hd.sr.ContentSequence(
                cast(list[hd.sr.ContentItem], list(descriptors))
            )
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
