"""Segmentation models: a label map over the volume, one measured finding per region.

The network's per-voxel probabilities (`LoadedModel.segment`, on the model's
voxel grid) become a label map there (argmax for softmax, the threshold for
sigmoids), which goes back onto the source images by nearest neighbour, as
MONAI's inverse of its Spacing does for a label map. Each label then gives:

- "lesions": one finding per connected region (26-connected), largest
  first, numbered 1, 2, ..., at most `max_findings`, none smaller than
  `segmentation.min_volume_ml`;
- "structure": one finding for the whole label (an organ in pieces is one organ);
- a label with no region: one absent finding, with the highest probability
  the label reached anywhere.

A region's probability is the highest its label reached inside it. Its
measurements are `model.measure`'s, on the source grid. The probability
of any label, mapped onto the source images, is the result's saliency: the
parametric map, GSPS and summary image show it as they do a classifier's.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from dicom_io.series import LoadedSeries
from model.manifest import ModelManifest, OutputLabel, SegmentationSpec
from model.measure import measure
from model.preprocess import Preprocessed, to_source_grid
from model.results import (
    AlgorithmInfo,
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


class Segmenter(Protocol):
    @property
    def manifest(self) -> ModelManifest: ...

    def segment(self, volume: np.ndarray) -> np.ndarray: ...

    def algorithm_info(self) -> AlgorithmInfo: ...


def label_volume(probabilities: np.ndarray, spec: SegmentationSpec, threshold: float) -> np.ndarray:
    """(channels, z, y, x) probabilities -> (z, y, x) uint8: 0 none, i label i (1-based)."""
    if spec.activation == "softmax":
        return np.argmax(probabilities, axis=0).astype(np.uint8)
    best = np.argmax(probabilities, axis=0)
    return np.where(probabilities.max(axis=0) >= threshold, best + 1, 0).astype(np.uint8)


def analyse_segmentation(
    series: LoadedSeries, model: Segmenter, observation: dict[str, object]
) -> AnalysisResult:
    """Preprocess, segment, map back, and measure each region as a finding."""
    m = model.manifest
    spec = m.segmentation or SegmentationSpec()
    pre = preprocess_volume(series, m.input)
    started = time.perf_counter()
    probabilities = _segment(model, pre.array, spec)
    seconds = round(time.perf_counter() - started, 4)
    foreground = probabilities[1:] if spec.activation == "softmax" else probabilities
    if foreground.shape != (len(m.labels), *pre.array.shape):
        raise ValueError(f"model {m.name} gave probabilities {probabilities.shape} on a "
                         f"{pre.array.shape} grid for {len(m.labels)} labels")  # fmt: skip
    on_net = sitk.GetImageFromArray(label_volume(probabilities, spec, m.threshold))
    on_net.CopyInformation(pre.image)
    on_source = sitk.GetArrayFromImage(sitk.Resample(
        on_net, series.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    values = sitk.GetArrayViewFromImage(series.image)
    voxel_ml = math.prod(series.image.GetSpacing()) / 1000.0
    findings: list[Finding] = []
    regions = np.zeros(on_source.shape, dtype=np.uint16)
    for index, label in enumerate(m.labels):
        parts = _regions(on_source == index + 1, label, spec, voxel_ml, m.max_findings)
        for number, part in enumerate(parts, start=1):
            r = measure(part, values, series.image)
            findings.append(Finding(
                label=label.name, finding_type=label.finding.concept(),
                finding_site=label.site.concept(),
                probability=_peak(foreground[index], part, pre, series),
                threshold=float(m.threshold),
                location=ImageLocation(
                    sop_instance_uid=series.sop_instance_uids[r.key_slice],
                    sop_class_uid=series.sop_class_uid, point=r.centroid, box=r.box,
                    frame_number=(series.frame_numbers[r.key_slice]
                                  if series.frame_numbers is not None else None)),
                lesion=number if label.segment_as == "lesions" else None,
                diameter_mm=round(r.longest_axial_diameter_mm, 2),
                volume_ml=round(r.volume_ml, 3), mean_intensity=round(r.mean, 1),
                max_intensity=round(r.maximum, 1),
            ))  # fmt: skip
            regions[part] = len(findings)
        if not parts:
            findings.append(Finding(label.name, label.finding.concept(), label.site.concept(),
                                    float(foreground[index].max()), float(m.threshold), None))
    saliency = foreground.max(axis=0)
    saliency[saliency < SALIENCY_FLOOR] = 0.0
    return AnalysisResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        outcome=Outcome.ANALYSED,
        algorithm=model.algorithm_info(),
        findings=findings,
        saliency=saliency_map_of(saliency, pre, series),
        label_map=label_map(series, regions),
        provenance=[*pre.steps, {"name": "segmentation", "parameters": {
            "grid": list(pre.array.shape), "roi_size": list(m.inference.roi_size or ()),
            "overlap": m.inference.overlap, "blend": m.inference.blend,
            "activation": spec.activation, "regions": int(regions.max()),
            "device": str(getattr(model, "device", "unknown"))},
            "seconds": seconds}],  # fmt: skip
        observation=observation,
    )


def _segment(model: Segmenter, volume: np.ndarray, spec: SegmentationSpec) -> np.ndarray:
    """The network's probabilities over the volume, or over its foreground box only."""
    inputs = model.manifest.input
    if not inputs.crop_foreground:
        return model.segment(volume)
    box = foreground_box(volume, inputs.crop_margin)
    channels = len(model.manifest.labels) + (1 if spec.activation == "softmax" else 0)
    out = np.zeros((channels, *volume.shape), dtype=np.float32)
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


def _regions(mask: np.ndarray, label: OutputLabel, spec: SegmentationSpec, voxel_ml: float,
             limit: int) -> list[np.ndarray]:  # fmt: skip
    """The label's findings' voxels: its connected regions, largest first, or all of it."""
    smallest = max(1, math.ceil(spec.min_volume_ml / voxel_ml - 1e-9))
    if label.segment_as == "structure":
        return [mask] if int(mask.sum()) >= smallest else []
    if not mask.any():
        return []
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    ranked = sitk.GetArrayFromImage(sitk.RelabelComponent(components, smallest, True))
    return [ranked == k for k in range(1, min(int(ranked.max()), limit) + 1)]


def _peak(probability: np.ndarray, part: np.ndarray, pre: Preprocessed,
          series: LoadedSeries) -> float:  # fmt: skip
    """The label's highest probability inside the region, on the source grid."""
    slices = np.flatnonzero(part.any(axis=(1, 2)))
    first, stop = int(slices[0]), int(slices[-1]) + 1
    mapped = to_source_grid(probability, pre, series, slices=(first, stop))
    return float(mapped[part[first:stop]].max())


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
