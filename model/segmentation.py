"""Segmentation models: a label map over the volume, one measured finding per region.

The network's per-voxel probabilities (`LoadedModel.segment`, on the model's
voxel grid) become a label map there (argmax for softmax, the threshold for
sigmoids), which goes back onto the source images by nearest neighbour, as
MONAI's inverse of its Spacing does for a label map. Each label then gives:

- "lesions": one finding per connected region (26-connected, on the
  model's grid), largest first, numbered 1, 2, ..., at most `max_findings`,
  none smaller than `segmentation.min_volume_ml`;
- "structure": one finding for the whole label (an organ in pieces is one organ);
- a label with no region: one absent finding, with the highest probability
  the label reached anywhere.

Each region is mapped onto the source grid by itself, within the box of
source voxels that covers it (a 300-slice series is never resampled
whole). Its probability is the highest its label reached inside it, its
measurements are `model.measure`'s, on the source grid. The probability of
any label, on the slices of the regions found, is the result's saliency:
the parametric map, GSPS and summary image show it as they do a
classifier's Grad-CAM on its top slices.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from dicom_io.series import LoadedSeries
from model.manifest import Hosted, OutputLabel, SegmentationSpec
from model.measure import measure
from model.preprocess import Preprocessed, source_grid
from model.results import (
    AnalysisResult,
    Finding,
    ImageLocation,
    LabelMap,
    Outcome,
)
from model.saliency_map import saliency_map_of
from model.volume import preprocess_volume

# Probabilities below this are left out of the saliency map: the map is then
# empty away from anything the network saw, as a Grad-CAM map is, rather than
# holding a faint background on every one of 300 images.
SALIENCY_FLOOR = 0.05


class Segmenter(Hosted, Protocol):
    def segment(self, volume: np.ndarray) -> np.ndarray: ...


def label_volume(probabilities: np.ndarray, spec: SegmentationSpec, threshold: float) -> np.ndarray:
    """(channels, z, y, x) probabilities -> (z, y, x) uint8: 0 none, i label i (1-based)."""
    if spec.activation == "softmax":
        return np.argmax(probabilities, axis=0).astype(np.uint8)
    best = np.argmax(probabilities, axis=0)
    return np.where(probabilities.max(axis=0) >= threshold, best + 1, 0).astype(np.uint8)


def analyse_segmentation(
    series: LoadedSeries, model: Segmenter, observation: dict[str, object]
) -> AnalysisResult:
    """Preprocess, segment, find the regions, map each back, and measure it as a finding."""
    m = model.manifest
    spec = m.segmentation_spec
    pre = preprocess_volume(series, m.input)
    started = time.perf_counter()
    probabilities = _segment(model, pre.array, spec)
    seconds = round(time.perf_counter() - started, 4)
    foreground = probabilities[1:] if spec.activation == "softmax" else probabilities
    if foreground.shape != (len(m.labels), *pre.array.shape):
        raise ValueError(f"model {m.name} gave probabilities {probabilities.shape} on a "
                         f"{pre.array.shape} grid for {len(m.labels)} labels")  # fmt: skip
    on_net = label_volume(probabilities, spec, m.threshold)
    values = sitk.GetArrayViewFromImage(series.image)
    net_ml = math.prod(pre.image.GetSpacing()) / 1000.0
    findings: list[Finding] = []
    cols, rows, n = series.image.GetSize()
    regions = np.zeros((n, rows, cols), dtype=np.uint16)
    reached: list[tuple[int, int]] = []  # network slices of the regions found
    for index, label in enumerate(m.labels):
        found = 0
        for box, part in _parts(on_net == index + 1, label, spec, net_ml, m.max_findings):
            origin, on_source = _on_source(part, box, pre, series)
            if not on_source.any():
                continue  # thinner than the source's slices: nothing a reader could see
            z0, y0, x0 = origin
            z1, y1, x1 = (o + s for o, s in zip(origin, on_source.shape, strict=True))
            r = measure(on_source, values[z0:z1, y0:y1, x0:x1],
                        source_grid(series, origin, on_source.shape))
            key = z0 + r.key_slice
            found += 1
            findings.append(label.as_finding(
                float(foreground[index][box][part].max()), m.threshold,
                location=ImageLocation(
                    sop_instance_uid=series.sop_instance_uids[key],
                    sop_class_uid=series.sop_class_uid,
                    point=(r.centroid[0] + x0, r.centroid[1] + y0),
                    box=(r.box[0] + x0, r.box[1] + y0, r.box[2] + x0, r.box[3] + y0),
                    frame_number=(series.frame_numbers[key]
                                  if series.frame_numbers is not None else None)),
                lesion=found if label.segment_as == "lesions" else None,
                diameter_mm=round(r.longest_axial_diameter_mm, 2),
                volume_ml=round(r.volume_ml, 3), mean_intensity=round(r.mean, 1),
                max_intensity=round(r.maximum, 1),
            ))  # fmt: skip
            view = regions[z0:z1, y0:y1, x0:x1]
            view[on_source] = len(findings)
            reached.append((box[0].start, box[0].stop))
        if not found:
            findings.append(label.as_finding(float(foreground[index].max()), m.threshold))
    return AnalysisResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        outcome=Outcome.ANALYSED,
        algorithm=model.algorithm_info(),
        findings=findings,
        saliency=saliency_map_of(_saliency(foreground, reached), pre, series),
        label_map=label_map(series, regions),
        provenance=[*pre.steps, {"name": "segmentation", "parameters": {
            "grid": list(pre.array.shape), "roi_size": list(m.inference.roi_size or ()),
            "overlap": m.inference.overlap, "blend": m.inference.blend,
            "activation": spec.activation, "regions": len(reached),
            "device": str(getattr(model, "device", "unknown"))},
            "seconds": seconds}],  # fmt: skip
        observation=observation,
    )


def _saliency(foreground: np.ndarray, reached: list[tuple[int, int]]) -> np.ndarray:
    """The probability of any label, on the network slices of the regions found (two more
    either side) and where it reaches SALIENCY_FLOOR: what the saliency objects show."""
    saliency = np.zeros(foreground.shape[1:], dtype=np.float32)
    for first, stop in reached:
        lo, hi = max(0, first - 2), min(int(foreground.shape[1]), stop + 2)
        saliency[lo:hi] = foreground[:, lo:hi].max(axis=0)
    saliency[saliency < SALIENCY_FLOOR] = 0.0
    return saliency


Box = tuple[slice, slice, slice]


def _parts(mask: np.ndarray, label: OutputLabel, spec: SegmentationSpec, voxel_ml: float,
           limit: int) -> list[tuple[Box, np.ndarray]]:  # fmt: skip
    """The label's findings on the network grid, each as (its box, its voxels in the box):
    its connected regions, largest first, or the whole label."""
    if not mask.any():
        return []
    smallest = max(1, math.ceil(spec.min_volume_ml / voxel_ml - 1e-9))
    if label.segment_as == "structure":
        if int(mask.sum()) < smallest:
            return []
        box = _box(np.nonzero(mask))
        return [(box, mask[box])]
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    ranked = sitk.RelabelComponent(components, smallest, True)
    shapes = sitk.LabelShapeStatisticsImageFilter()
    shapes.Execute(ranked)
    array = sitk.GetArrayViewFromImage(ranked)
    out = []
    for k in sorted(shapes.GetLabels())[:limit]:
        x, y, z, sx, sy, sz = shapes.GetBoundingBox(k)
        box = (slice(z, z + sz), slice(y, y + sy), slice(x, x + sx))
        out.append((box, array[box] == k))
    return out


def _box(indices: tuple[np.ndarray, ...]) -> Box:
    z, y, x = (slice(int(a.min()), int(a.max()) + 1) for a in indices)
    return z, y, x


def _on_source(part: np.ndarray, box: Box, pre: Preprocessed, series: LoadedSeries
               ) -> tuple[tuple[int, int, int], np.ndarray]:  # fmt: skip
    """A region of the network grid on the source grid (nearest neighbour, as MONAI inverts
    a label map), within the source box that covers it: (its first index (z, y, x), mask)."""
    image = sitk.GetImageFromArray(part.astype(np.uint8))
    image.SetSpacing(pre.image.GetSpacing())
    image.SetDirection(pre.image.GetDirection())
    image.SetOrigin(pre.image.TransformIndexToPhysicalPoint(
        (box[2].start, box[1].start, box[0].start)))
    source = series.image
    size = np.asarray(source.GetSize())
    corners = [source.TransformPhysicalPointToContinuousIndex(
        image.TransformContinuousIndexToPhysicalPoint((x, y, z)))
        for x in (-1.0, part.shape[2]) for y in (-1.0, part.shape[1])
        for z in (-1.0, part.shape[0])]  # fmt: skip
    low = np.clip(np.floor(np.min(corners, axis=0)).astype(int), 0, size)
    high = np.clip(np.ceil(np.max(corners, axis=0)).astype(int) + 1, 0, size)
    grid = source_grid(series, (int(low[2]), int(low[1]), int(low[0])),
                 (int(high[2] - low[2]), int(high[1] - low[1]), int(high[0] - low[0])))
    mapped = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    return (int(low[2]), int(low[1]), int(low[0])), sitk.GetArrayFromImage(mapped).astype(bool)


def _segment(model: Segmenter, volume: np.ndarray, spec: SegmentationSpec) -> np.ndarray:
    """The network's probabilities over the volume, or over its foreground box only."""
    inputs = model.manifest.input
    if not inputs.crop_foreground:
        return model.segment(volume)
    box = foreground_box(volume, inputs.crop_margin)
    out = np.zeros((model.manifest.output_channels(), *volume.shape), dtype=np.float32)
    if spec.activation == "softmax":
        out[0] = 1.0  # outside the box: background, for certain
    if box is not None:
        out[(slice(None), *box)] = model.segment(np.ascontiguousarray(volume[box]))
    return out


def foreground_box(volume: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    """The box of voxels above 0 (MONAI's CropForeground default), `margin` wider, clipped."""
    inside = np.nonzero(volume > 0)
    if inside[0].size == 0:
        return None
    return tuple(slice(max(0, int(a.min()) - margin), min(n, int(a.max()) + 1 + margin))
                 for a, n in zip(inside, volume.shape, strict=True))  # type: ignore[return-value]


def label_map(series: LoadedSeries, regions: np.ndarray) -> LabelMap | None:
    """The regions on the source images they reach, in slice order; None if there are none."""
    ks = np.flatnonzero(regions.reshape(regions.shape[0], -1).any(axis=1))
    if ks.size == 0:
        return None
    return LabelMap(
        series_instance_uid=series.series_instance_uid,
        source_sop_instance_uids=[series.sop_instance_uids[k] for k in ks],
        frames=np.ascontiguousarray(regions[ks]),
        source_frame_numbers=([series.frame_numbers[k] for k in ks]
                              if series.frame_numbers is not None else None),  # fmt: skip
    )
