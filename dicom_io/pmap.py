"""The saliency map as a DICOM Parametric Map: float values a viewer overlays.

OHIF 3.13 refuses a FRACTIONAL SEG whose values are not all 0 or the maximum
("Fractional segmentations are not yet supported"), and has its own handler
for Parametric Maps (SOP class 1.2.840.10008.5.1.4.1.1.30). So the map goes
as a Parametric Map: 32-bit float pixel data, one frame per source image it
reaches, with a Real World Value Mapping that states what the numbers are
(a saliency score in [0, 1], no units). Cross-sectional sources only (see
`build_saliency_map`).

OHIF's adapter (@cornerstonejs/adapters `ParametricMap.generateToolState`)
copies each frame to the index of its source image in the series volume,
in a buffer only as long as the map: a map of 8 frames on slices 20-27 of
40 fails ("Invalid typed array length"). So the map has a frame for every
image of the series, zero where the model saw nothing, and is written with
the Deflated transfer syntax (`DEFLATED`), in which those zero frames cost
next to nothing on the wire and in the PACS.

That copy is then dropped: the adapter returns the frames as read, in file
order (`insertPixelDataPlanar`'s result is not used), and OHIF fills the
overlay volume with them in that order, over a CT volume sorted ascending
along the slice normal, row x column (`sortImageIdsAndGetSpacing`). So the
frames ascend along that normal, frame 1 the lowest, with the position's
Dimension Index Value equal to the frame number: frame order, position and
index agree, and OHIF puts every frame on its own slice. highdicom writes
them the other way, top down, which put the colour on the mirror-image
slices (`_ascending` turns them round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_io import codes as pm_codes
from dicom_io.identity import NewObject, identity, station
from dicom_io.seg import align_saliency, checked_frames, without_bogus_spacing
from dicom_io.sr import algorithm_equipment
from model.results import AlgorithmInfo, Finding, SaliencyMap

PARAMETRIC_MAP_SERIES_DESCRIPTION = "AI SALIENCY MAP - NOT VERIFIED"
# The transfer syntax the map is written in (see the module's docstring).
DEFLATED = DeflatedExplicitVRLittleEndian


def build_saliency_map(
    saliency: SaliencyMap,
    source_headers: Sequence[Dataset],
    algorithm: AlgorithmInfo,
    finding: Finding,
    *,
    series_description: str = PARAMETRIC_MAP_SERIES_DESCRIPTION,
    device_serial_number: str | None = None,
    **new: Unpack[NewObject],
) -> hd.pm.ParametricMap:
    """The saliency of one finding as a float Parametric Map on the source images' grid.

    `source_headers` are the images the map lies on (pixel data not needed);
    as for the SEG, they are matched to `saliency.source_sop_instance_uids`.
    A map that is zero everywhere is a ValueError: there is nothing to show.
    """
    frames = checked_frames(saliency)
    images, pixel_array = align_saliency(saliency, frames, source_headers)
    if saliency.source_frame_numbers is None:  # multi-frame sources come whole already
        images, pixel_array = _whole_series(images, pixel_array, source_headers)
    if "FrameOfReferenceUID" not in images[0]:
        # highdicom 0.28 cannot index the frames of a map without a frame of
        # reference (its dimension index fails); projection images get the
        # BINARY SEG, the GSPS and the summary image instead.
        raise ValueError("a parametric map needs source images with a frame of reference")
    if not pixel_array.any():
        raise ValueError("the saliency map is zero everywhere: build no parametric map")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="AI_SALIENCY",
        lut_explanation=f"AI saliency for {finding.finding_type.meaning}, 0 to 1"[:64],
        unit=pm_codes.UNITLESS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=[without_bogus_spacing(i) for i in images],
        pixel_array=np.ascontiguousarray(pixel_array, dtype=np.float32),
        **identity(new),
        device_serial_number=station(device_serial_number),
        # A heat map of an image region, not a picture of the patient.
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        # Opens showing the whole range; viewers that overlay it colour it.
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="AI_SALIENCY",
        content_description=f"AI saliency map for {finding.label}, not verified"[:64],
        contributing_equipment=[algorithm_equipment(algorithm)],
    )
    _ascending(pm)
    # highdicom writes Explicit VR Little Endian; Deflated is that, zipped on save.
    pm.file_meta.TransferSyntaxUID = DEFLATED
    pm.SeriesDescription = series_description
    # General Series: Laterality is Type 2C (paired body parts); the source's
    # value where it has one, else present and empty, as dciodvfy asks.
    pm.Laterality = images[0].get("Laterality", "")
    return pm


def _whole_series(
    images: list[Dataset], pixel_array: np.ndarray, source_headers: Sequence[Dataset]
) -> tuple[list[Dataset], np.ndarray]:
    """Every image of the map's series, in slice order, with zero frames where it has none."""
    series_uid = images[0].SeriesInstanceUID
    series = [h for h in source_headers if h.SeriesInstanceUID == series_uid]
    if "ImagePositionPatient" in images[0] and "ImageOrientationPatient" in images[0]:
        normal = np.cross(*np.reshape(np.asarray(images[0].ImageOrientationPatient, float), (2, 3)))
        series.sort(key=lambda h: float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))))
    frames = {img.SOPInstanceUID: pixel_array[k] for k, img in enumerate(images)}
    full = np.zeros((len(series), *pixel_array.shape[1:]), dtype=np.float32)
    for k, header in enumerate(series):
        if header.SOPInstanceUID in frames:
            full[k] = frames[header.SOPInstanceUID]
    return series, full


def _ascending(pm: hd.pm.ParametricMap) -> None:
    """Put the frames in ascending order along the slice normal (module docstring).

    The per-frame functional groups and the pixel data move together, and the
    position's Dimension Index Value is renumbered to the new frame number, so
    that frame order, position and dimension index all say the same.
    """
    orientation = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    row, col = np.reshape(np.asarray(orientation.ImageOrientationPatient, float), (2, 3))
    normal = np.cross(row, col)
    frames = list(pm.PerFrameFunctionalGroupsSequence)
    heights = [
        float(np.dot(normal, np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)))
        for f in frames
    ]
    order = np.argsort(heights, kind="stable")
    pixels = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(len(frames), -1)
    pm.FloatPixelData = np.ascontiguousarray(pixels[order]).tobytes()
    pointers = [item.DimensionIndexPointer for item in pm.DimensionIndexSequence]
    position = pointers.index(Tag("ImagePositionPatient"))
    reordered = [frames[k] for k in order]
    for number, frame in enumerate(reordered, start=1):
        content = frame.FrameContentSequence[0]
        values = [int(v) for v in np.atleast_1d(content.DimensionIndexValues)]
        values[position] = number
        content.DimensionIndexValues = values if len(values) > 1 else values[0]
    pm.PerFrameFunctionalGroupsSequence = reordered
