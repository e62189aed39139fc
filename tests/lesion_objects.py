"""A segmentation model's outputs for one lesion, as the viewer test builds them.

`lesion_seg`: a BINARY SEG, one segment ("Nodule 1") on the source CT's own
grid; `lesion_sr`: a TID 1500 SR whose lesion is measured twice under one
Tracking UID, the SEG segment's:

* a TID 1411 volumetric group: the segment (Referenced Segment), Volume,
  Long Axis, mean and maximum attenuation, finding type and site;
* a second TID 1411 group, by Image Regions: the lesion's box (a closed
  POLYLINE) on every slice it is on, the largest first, and a Comment that
  says the volume.

OHIF 3.13.2 places a measurement only by a SCOORD of its group; a group
without one (TID 1411 with a segment) gets no coordinates and its SR
viewport throws ("reading 'ReferencedSOPSequence'"). OHIF merges groups by
Tracking UID, so the region group gives the segment group's numbers a place
on the image, and its first box is one OHIF rehydrates (RectangleROI), the
Comment its label. Not a TID 1410 twin: PixelMed 1.0 applies TID 1410 to
every group of a report with exactly one group-level 2D Image Region, the
segment group too, and fails it; two or more regions keep it to TID 1411.
A lesion on a single slice would give one region: not handled here.

Inputs are plain: source datasets, the mask (z, y, x) on their grid, and
the numbers, so that the daemon's own builders can replace these later.
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

SEG_DESCRIPTION = "AI LESIONS - NOT VERIFIED"
SR_DESCRIPTION = "AI LESION MEASUREMENTS - NOT VERIFIED"
LESION = "Nodule 1"
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
ALGORITHM = ("secondreader lesion segmenter (test)", "1")


def lesion_label(volume_ml: float, diameter_mm: float) -> str:
    """The Comment OHIF takes as the tracked measurement's label."""
    return f"AI, NOT VERIFIED: {LESION}, volume {volume_ml:.2f} ml, long axis {diameter_mm:.1f} mm"


def largest_slice(mask: np.ndarray) -> int:
    """Index (z) of the axial slice holding most of the lesion."""
    return int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))


def lesion_seg(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    volume_ml: float,
    diameter_mm: float,
    mean_hu: float,
    max_hu: float,
) -> hd.seg.Segmentation:
    """A BINARY SEG of `mask` (z, y, x; slice k on `sources[k]`), one segment per lesion.

    The numbers are not part of a SEG; taken so that SEG and SR builders
    share one signature.
    """
    del volume_ml, diameter_mm, mean_hu, max_hu
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=LESION,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM[0], family=codes.DCM.ArtificialIntelligence, version=ALGORITHM[1]
        ),
        tracking_uid=generate_uid(),
        tracking_id=LESION,
        anatomic_regions=[codes.SCT.Lung],
    )
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=90,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="secondreader",
        manufacturer_model_name="secondreader",
        software_versions="test",
        device_serial_number="test",
        series_description=SEG_DESCRIPTION,
        content_label="AI_LESIONS",
        omit_empty_frames=True,
    )


def lesion_sr(
    sources: Sequence[Dataset],
    seg: Dataset,
    mask: np.ndarray,
    volume_ml: float,
    diameter_mm: float,
    mean_hu: float,
    max_hu: float,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of the SEG's lesion: volumetric group and its planar twin."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM[0], version=ALGORITHM[1], family=codes.DCM.ArtificialIntelligence
    )
    tracking = hd.sr.TrackingIdentifier(uid=seg.SegmentSequence[0].TrackingUID, identifier=LESION)
    common = {
        "tracking_identifier": tracking,
        "finding_type": codes.SCT.Nodule,
        "finding_sites": [hd.sr.FindingSite(codes.SCT.Lung)],
        "algorithm_id": algorithm,
    }
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
        ),
        measurements=lesion_measurements(volume_ml, diameter_mm, mean_hu, max_hu),
        **common,
    )
    regions = region_twin(sources, mask, lesion_label(volume_ml, diameter_mm), common)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=generate_uid(), name=ALGORITHM[0]
                ),
            )
        ),
        procedure_reported=sr_codes.IMAGING_PROCEDURE,
        imaging_measurements=[volumetric, regions],
        referenced_images=[sources[largest_slice(mask)]],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=91,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="secondreader",
        series_description=SR_DESCRIPTION,
    )


def lesion_measurements(
    volume_ml: float, diameter_mm: float, mean_hu: float, max_hu: float
) -> list[hd.sr.Measurement]:
    """TID 1419 of the whole lesion: Volume (CID 7472), Long Axis (CID 7470), HU statistics.

    Mean and maximum are the Attenuation Coefficient with a Derivation
    modifier (CID 7464), as TID 1419 words region statistics.
    """
    hu = codes.UCUM.HounsfieldUnit
    attenuation = codes.DCM.AttenuationCoefficient
    return [
        hd.sr.Measurement(name=codes.SCT.Volume, value=volume_ml, unit=MILLILITRE),
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=diameter_mm, unit=codes.UCUM.Millimeter),
        hd.sr.Measurement(name=attenuation, value=mean_hu, unit=hu, derivation=codes.SCT.Mean),
        hd.sr.Measurement(name=attenuation, value=max_hu, unit=hu, derivation=codes.SCT.Maximum),
    ]


def region_twin(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    label: str,
    common: dict[str, object],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 by Image Regions: the lesion's box on each slice, the largest first; a Comment.

    OHIF takes the merged groups' first SCOORD as the measurement's place
    and rehydrates a 5-point POLYLINE Image Region as its RectangleROI. No
    NUM here: its adapters look for the region inside the first NUM, and
    only in a group without one at the group's own Image Region.
    """
    regions = [box_region(sources[k], box) for k, box in slice_boxes(mask)]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        referenced_regions=regions,
        **deepcopy(common),  # type: ignore[arg-type]
    )
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=sr_codes.COMMENT,
            value=label,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    return group


def slice_boxes(mask: np.ndarray) -> list[tuple[int, tuple[float, float, float, float]]]:
    """(slice, box) of every slice the lesion is on, the largest slice first.

    A box is (column, row) of the lesion's outer pixel edges on that slice.
    """
    largest = largest_slice(mask)
    slices = [int(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0] if k != largest]
    boxes = []
    for k in [largest, *slices]:
        rows, columns = np.nonzero(mask[k])
        edges = (
            float(columns.min()), float(rows.min()),
            float(columns.max()) + 1.0, float(rows.max()) + 1.0,
        )  # fmt: skip
        boxes.append((k, edges))
    return boxes


def box_region(image: Dataset, box: tuple[float, float, float, float]) -> hd.sr.ImageRegion:
    c0, r0, c1, r1 = box
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        # A closed POLYLINE repeats its first point (PS3.3 C.18.6.1.2).
        graphic_data=np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=float),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID,
            referenced_sop_instance_uid=image.SOPInstanceUID,
        ),
    )
