"""3D detection models: boxes in the volume, each a lesion, placed in patient coordinates.

The network reads the whole series on its voxel grid (`model.volume`, as a
segmentation model does, without windows: a detector's boxes would need
merging across windows) and returns boxes (`LoadedModel.detections_3d`):
low and high corner in network voxels, a score logit (through
`[calibration]`) and a label index (outside the labels: padding).

Each box is a lesion; its corners go through patient coordinates onto the
source series. Per label the present lesions, most suspicious first and at
most `max_findings`, are the findings "Lesion 1", "Lesion 2", ...; a label
with none present is one absent finding, at its most suspicious box. A
finding's key image is the source image nearest the box's centre, its 2D
box there the box's extent in that image (what GSPS and summary draw), and
its `region_3d` the box's section in that image's plane in patient mm (the
SR's SCOORD3D). Its diameter is the box's longest side in mm.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from dicom_io.series import LoadedSeries
from model.inference import calibrated
from model.manifest import Hosted
from model.results import AnalysisResult, Finding, ImageLocation, Outcome
from model.saliency_map import saliency_map_of
from model.volume import preprocess_volume


class Detector3D(Hosted, Protocol):
    def detections_3d(self, volume: np.ndarray) -> np.ndarray: ...


def _corners(box: np.ndarray) -> list[tuple[float, float, float]]:
    """The 8 corners of a box (x0, y0, z0, x1, y1, z1) as continuous indices (centres at 0)."""
    lo, hi = box[:3] - 0.5, box[3:6] - 0.5  # edges in voxel units: centres at -0.5
    return [(float(x), float(y), float(z)) for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
            for z in (lo[2], hi[2])]  # fmt: skip


def place(box: np.ndarray, grid: sitk.Image, series: LoadedSeries
          ) -> tuple[int, tuple[float, float, float, float], float, np.ndarray]:  # fmt: skip
    """Key source slice, SCOORD box on it, longest side (mm) and its section's polyline (LPS)."""
    points = np.array([grid.TransformContinuousIndexToPhysicalPoint(c) for c in _corners(box)])
    source = series.image
    index = np.array([source.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
    cols, rows, n = source.GetSize()
    key = int(np.clip(round(float(index[:, 2].mean())), 0, n - 1))
    c0, c1 = (float(np.clip(v + 0.5, 0, cols)) for v in (index[:, 0].min(), index[:, 0].max()))
    r0, r1 = (float(np.clip(v + 0.5, 0, rows)) for v in (index[:, 1].min(), index[:, 1].max()))
    sides = (np.asarray(box[3:6], dtype=float) - np.asarray(box[:3], dtype=float)) * np.asarray(
        grid.GetSpacing())
    corners = ((c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0))  # closed
    section = np.array([source.TransformContinuousIndexToPhysicalPoint((c - 0.5, r - 0.5, key))
                        for c, r in corners])  # fmt: skip
    return key, (c0, r0, c1, r1), float(np.abs(sides).max()), section


def analyse_detections_3d(
    series: LoadedSeries, model: Detector3D, observation: dict[str, object]
) -> AnalysisResult:
    """Preprocess the volume, detect, and report per label the most suspicious boxes."""
    m = model.manifest
    pre = preprocess_volume(series, m.input)
    started = time.perf_counter()
    raw = model.detections_3d(pre.array)
    seconds = round(time.perf_counter() - started, 4)
    scores = calibrated(raw[:, 6], m.calibration) if len(raw) else np.zeros(0)
    labels = np.rint(raw[:, 7]).astype(int) if len(raw) else np.zeros(0, dtype=int)
    saliency = np.zeros(pre.array.shape, dtype=np.float32)
    findings: list[Finding] = []
    for index, label in enumerate(m.labels):
        mine = sorted(np.flatnonzero(labels == index), key=lambda j: -scores[j])
        present = [j for j in mine if scores[j] >= m.threshold]
        chosen = present[: m.max_findings] or mine[:1]
        for number, j in enumerate(chosen, start=1):
            key, box, longest, section = place(raw[j], pre.image, series)
            lo = np.floor(np.clip(raw[j, :3], 0, None)).astype(int)
            hi = np.ceil(raw[j, 3:6]).astype(int)
            region = saliency[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]  # (z, y, x)
            np.maximum(region, float(scores[j]), out=region)
            findings.append(label.as_finding(
                float(scores[j]), m.threshold,
                location=ImageLocation(
                    sop_instance_uid=series.sop_instance_uids[key],
                    sop_class_uid=series.sop_class_uid,
                    point=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), box=box,
                    frame_number=(series.frame_numbers[key]
                                  if series.frame_numbers is not None else None)),
                lesion=number if present else None, diameter_mm=round(longest, 2),
                region_3d=tuple((float(x), float(y), float(z)) for x, y, z in section),
            ))  # fmt: skip
        if not chosen:  # no box at all for the label: absent, nowhere
            findings.append(label.as_finding(0.0, m.threshold))
    return AnalysisResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        outcome=Outcome.ANALYSED,
        algorithm=model.algorithm_info(),
        findings=findings,
        saliency=saliency_map_of(saliency, pre, series),
        provenance=[*pre.steps, {"name": "detection", "parameters": {
            "grid": list(pre.array.shape), "boxes": int(len(raw)),
            "device": str(getattr(model, "device", "unknown"))}, "seconds": seconds}],  # fmt: skip
        observation=observation,
    )
