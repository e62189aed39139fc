"""The model's saliency map, and a segmentation model's regions, as DICOM Segmentations.

`build_saliency_seg`: the map itself, FRACTIONAL (probability), for viewers
that show fractional segmentations; `build_region_seg`: the map thresholded
at half its peak, BINARY, for viewers that load binary ones only;
`build_segmentation_seg`: a segmentation model's regions, BINARY, one
segment per measured region (each lesion its own, so that the SR's
volumetric group of that lesion references exactly the voxels it measured).

One segment per SEG, on the source images' own grid (SEG cannot resample),
in the study of its images and in a new series. The segment carries the
finding's Tracking UID, the same as the SR measurement group of that finding,
so that a reader can pair them.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io import codes as seg_codes
from dicom_io.identity import NewObject, identity, station
from dicom_io.sr import algorithm_equipment, finding_tracking_uid
from model.results import AlgorithmInfo, CodedConcept, Finding, LabelMap, SaliencyMap, segmented

SALIENCY_SERIES_DESCRIPTION = "AI SALIENCY - NOT VERIFIED"
REGION_SERIES_DESCRIPTION = "AI REGION - NOT VERIFIED"
SEGMENTATION_SERIES_DESCRIPTION = "AI SEGMENTATION - NOT VERIFIED"
# The BINARY SEG's region: saliency at or above this fraction of its peak.
REGION_FRACTION = 0.5

# Saliency below this is set to 0 before encoding. Stored as 8-bit fractions
# anyway (1/255 steps), and without it every slice holds some faint noise, so
# no frame is empty and a 300-slice series would keep all 300 frames.
DEFAULT_FLOOR = 0.05


def build_saliency_seg(
    saliency: SaliencyMap,
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    finding: Finding,
    *,
    series_description: str = SALIENCY_SERIES_DESCRIPTION,
    segmented_property_category: CodedConcept | None = None,
    floor: float = DEFAULT_FLOOR,
    device_serial_number: str | None = None,
    **new: Unpack[NewObject],
) -> hd.seg.Segmentation:
    """The saliency of one finding as a one-segment FRACTIONAL/PROBABILITY SEG.

    `source_headers` are the images the map lies on (pixel data not needed),
    in any order: they are matched to `saliency.source_sop_instance_uids`.
    For a multi-frame source (`saliency.source_frame_numbers` set) give that
    one image. The segment's type is the finding type, its anatomic region the
    finding site, its category `segmented_property_category` or, by default,
    "Morphologically abnormal structure". Values below `floor` become 0 and
    frames left empty are omitted; a map empty everywhere is a ValueError.
    """
    frames = checked_frames(saliency)
    if not 0.0 <= floor < 1.0:
        raise ValueError("floor must lie in [0, 1)")
    images, pixel_array = align_saliency(saliency, frames, source_headers)
    pixel_array = np.where(pixel_array >= floor, pixel_array, np.float32(0.0))
    if not pixel_array.any():
        # highdicom would then keep every frame, all empty: no use to anyone.
        raise ValueError(f"no saliency at or above {floor}: nothing to store, build no SEG")
    return _segmentation(
        images,
        pixel_array,
        hd.seg.SegmentationTypeValues.FRACTIONAL,
        algorithm,
        [(finding, f"AI saliency: {finding.label}")],
        content_label="AI_SALIENCY",
        content_description=f"AI saliency map for {finding.label}, not verified",
        segmented_property_category=segmented_property_category,
        series_description=series_description,
        device_serial_number=device_serial_number,
        new=new,
    )


def build_region_seg(
    saliency: SaliencyMap,
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    finding: Finding,
    *,
    series_description: str = REGION_SERIES_DESCRIPTION,
    segmented_property_category: CodedConcept | None = None,
    fraction: float = REGION_FRACTION,
    device_serial_number: str | None = None,
    **new: Unpack[NewObject],
) -> hd.seg.Segmentation:
    """The thresholded saliency (at `fraction` of its peak) as a one-segment BINARY SEG.

    For viewers that load binary segmentations only (OHIF 3.13 among them).
    """
    frames = checked_frames(saliency)
    if not 0.0 < fraction <= 1.0:
        raise ValueError("fraction must lie in (0, 1]")
    images, pixel_array = align_saliency(saliency, frames, source_headers)
    peak = float(pixel_array.max())
    if peak <= 0.0:
        raise ValueError("the saliency map is zero everywhere: build no SEG")
    mask = (pixel_array >= fraction * peak).astype(np.uint8)
    return _segmentation(
        images,
        mask,
        hd.seg.SegmentationTypeValues.BINARY,
        algorithm,
        [(finding, f"AI region: {finding.label}")],
        content_label="AI_REGION",
        content_description=f"AI region for {finding.label}, not verified",
        segmented_property_category=segmented_property_category,
        series_description=series_description,
        device_serial_number=device_serial_number,
        new=new,
    )


def build_segmentation_seg(
    label_map: LabelMap,
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    findings: list[Finding],
    *,
    series_description: str = SEGMENTATION_SERIES_DESCRIPTION,
    segmented_property_category: CodedConcept | None = None,
    device_serial_number: str | None = None,
    **new: Unpack[NewObject],
) -> hd.seg.Segmentation:
    """A segmentation model's regions as a BINARY SEG: segment k is the k-th measured finding.

    Each segment is labelled with its finding ("AI nodule 1"), typed with its
    finding code, placed at its finding site, and carries the finding's
    Tracking UID, as the SR's volumetric group of that finding does.
    """
    regions = segmented(findings)
    if not regions:
        raise ValueError("no measured region: build no SEG")
    labels = np.asarray(label_map.frames)
    if labels.ndim != 3 or labels.shape[0] != len(label_map.source_sop_instance_uids):
        raise ValueError("label map frames must be (n, rows, cols), one per source UID")
    images, aligned = align_saliency(label_map, labels, source_headers)
    pixel_array = np.stack([aligned == index + 1 for index, _ in regions], axis=-1)
    empty = [f.key for (_, f), k in zip(regions, range(pixel_array.shape[-1]), strict=True)
             if not pixel_array[..., k].any()]  # fmt: skip
    if empty:
        raise ValueError(f"the label map holds no voxel of {', '.join(empty)}")
    return _segmentation(
        images,
        pixel_array.astype(np.uint8),
        hd.seg.SegmentationTypeValues.BINARY,
        algorithm,
        [(f, f"AI {f.key}") for _, f in regions],
        content_label="AI_SEGMENTATION",
        content_description=f"AI segmentation by {algorithm.name}, not verified",
        segmented_property_category=segmented_property_category,
        series_description=series_description,
        device_serial_number=device_serial_number,
        new=new,
    )


def checked_frames(saliency: SaliencyMap) -> np.ndarray:
    """The map's frames as float32 (n, rows, cols), checked to lie in [0, 1]."""
    frames = np.asarray(saliency.frames, dtype=np.float32)
    if frames.ndim != 3 or frames.shape[0] != len(saliency.source_sop_instance_uids):
        raise ValueError("saliency frames must be (n, rows, cols), one per source UID")
    if not np.isfinite(frames).all() or frames.min() < 0.0 or frames.max() > 1.0:
        raise ValueError("saliency values must lie in [0, 1]")
    return frames


def _segmentation(
    images: list[Dataset],
    pixel_array: np.ndarray,
    segmentation_type: hd.seg.SegmentationTypeValues,
    algorithm: AlgorithmInfo,
    segments: list[tuple[Finding, str]],
    *,
    content_label: str,
    content_description: str,
    segmented_property_category: CodedConcept | None,
    series_description: str,
    device_serial_number: str | None,
    new: NewObject,
) -> hd.seg.Segmentation:
    study_instance_uid = images[0].StudyInstanceUID
    category = (
        seg_codes.to_hd(segmented_property_category)
        if segmented_property_category is not None
        else seg_codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment_label[:64],
            segmented_property_category=category,
            segmented_property_type=seg_codes.to_hd(finding.finding_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm.name,
                family=codes.DCM.ArtificialIntelligence,
                version=algorithm.version,
                parameters=algorithm.parameters or None,
            ),
            tracking_uid=finding_tracking_uid(study_instance_uid, algorithm.device_uid,
                                              finding.key),  # fmt: skip
            tracking_id=f"AI {finding.key}",
            anatomic_regions=[seg_codes.to_hd(finding.finding_site)],
        )
        for number, (finding, segment_label) in enumerate(segments, start=1)
    ]
    fractional = segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    seg = hd.seg.Segmentation(
        source_images=[without_bogus_spacing(i) for i in images],
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        fractional_type=(
            hd.seg.SegmentationFractionalTypeValues.PROBABILITY if fractional else None
        ),
        segment_descriptions=descriptions,
        **identity(new),
        # Type 1 in the SEG's Enhanced General Equipment: which installation
        # made it. The daemon should pass its configured station identifier.
        device_serial_number=station(device_serial_number),
        series_description=series_description,
        content_label=content_label,
        content_description=content_description[:64],
        omit_empty_frames=True,
        contributing_equipment=[algorithm_equipment(algorithm)],
        coding_schemes=[seg_codes.IHE_SCHEME_ITEM],
    )
    if "FrameOfReferenceUID" not in seg:
        # Projection source (CR, DX): General Image's Patient Orientation is
        # then required (Type 2C); highdicom does not copy it.
        seg.PatientOrientation = images[0].get("PatientOrientation", "")
    return seg


def align_saliency(
    saliency: SaliencyMap | LabelMap, frames: np.ndarray, source_headers: Sequence[Dataset]
) -> tuple[list[Dataset], np.ndarray]:
    """Source images and a pixel array in the order highdicom pairs them (SEG and PM)."""
    by_uid = {h.SOPInstanceUID: h for h in source_headers}
    missing = [u for u in saliency.source_sop_instance_uids if u not in by_uid]
    if missing:
        raise ValueError(f"{len(missing)} saliency frames lie on images not in source_headers")
    if saliency.source_frame_numbers is None:
        images = [by_uid[u] for u in saliency.source_sop_instance_uids]
        if len({u for u in saliency.source_sop_instance_uids}) != len(images):
            raise ValueError("two saliency frames on one single-frame image")
        _check_shape(images[0], frames)
        return images, frames
    # Multi-frame source: highdicom wants one SEG frame per source frame, in
    # source frame order; frames the map does not cover stay empty (omitted).
    if len(set(saliency.source_sop_instance_uids)) != 1:
        raise ValueError("a multi-frame saliency map must lie on one source image")
    if len(saliency.source_frame_numbers) != frames.shape[0]:
        raise ValueError("one source frame number per saliency frame")
    image = by_uid[saliency.source_sop_instance_uids[0]]
    _check_shape(image, frames)
    full = np.zeros((int(image.NumberOfFrames), *frames.shape[1:]), dtype=frames.dtype)
    for k, number in enumerate(saliency.source_frame_numbers):
        full[number - 1] = frames[k]
    return [image], full


def without_bogus_spacing(image: Dataset) -> Dataset:
    """The header, less a Pixel Spacing of zeros (some CRs write 0\\0 for unknown).

    highdicom copies it into the SEG's Pixel Measures, where zero is invalid;
    without it the SEG simply states no spacing, as the source really does.
    """
    spacing = image.get("PixelSpacing")
    if spacing is None or "FrameOfReferenceUID" in image or all(float(v) > 0 for v in spacing):
        return image
    view = deepcopy(image)
    del view.PixelSpacing
    return view


def _check_shape(image: Dataset, frames: np.ndarray) -> None:
    if frames.shape[1:] != (int(image.Rows), int(image.Columns)):
        raise ValueError(
            f"saliency frames are {frames.shape[1:]}, images {image.Rows}x{image.Columns}"
        )
