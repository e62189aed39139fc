"""Detection models: boxes with scores on each slice, grouped into lesions over the series.

A detector gives, per slice, k boxes (x0, y0, x1, y1 in network pixels, (0, 0)
the top left corner of the top left pixel, as SCOORD counts), each with a
score logit and a label index. Each box is mapped through patient
coordinates onto the source image it lies on, and boxes of one label on
neighbouring source slices that overlap (IoU >= IOU_SAME_LESION) are one
lesion, scored by its best box, located on that box's image.

Per label, the present lesions (calibrated score >= threshold), most
suspicious first and at most `max_findings`, are the findings, numbered 1,
2, ...; a label with none is one absent finding, at its most suspicious box.
A finding's diameter is its key box's longer side in mm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dicom_io.series import LoadedSeries
from model.inference import calibrated
from model.manifest import Hosted
from model.preprocess import Preprocessed, preprocess
from model.results import AnalysisResult, Finding, ImageLocation, Outcome
from model.saliency_map import saliency_map_of

IOU_SAME_LESION = 0.3


class Detector(Hosted, Protocol):
    def detections(self, slices: np.ndarray) -> np.ndarray: ...


@dataclass
class _Box:
    source: int  # source slice index
    box: tuple[float, float, float, float]  # SCOORD (col0, row0, col1, row1) on that slice
    probability: float
    label: int
    network: tuple[int, tuple[float, float, float, float]]  # network slice, box


@dataclass
class _Lesion:
    boxes: list[_Box] = field(default_factory=list)

    @property
    def best(self) -> _Box:
        return max(self.boxes, key=lambda b: b.probability)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _to_source(pre: Preprocessed, series: LoadedSeries, k: int,
               box: tuple[float, float, float, float],
               ) -> tuple[int, tuple[float, float, float, float]]:  # fmt: skip
    """A network box on network slice k -> (source slice, SCOORD box on it)."""
    size = series.image.GetSize()
    corners = []
    for x, y in ((box[0], box[1]), (box[2], box[3])):
        # Edges in pixel units are centres at -0.5: continuous index, both ways.
        point = pre.image.TransformContinuousIndexToPhysicalPoint((x - 0.5, y - 0.5, float(k)))
        corners.append(series.image.TransformPhysicalPointToContinuousIndex(point))
    source = int(np.clip(round((corners[0][2] + corners[1][2]) / 2), 0, size[2] - 1))
    cols = sorted(float(np.clip(c[0] + 0.5, 0, size[0])) for c in corners)
    rows = sorted(float(np.clip(c[1] + 0.5, 0, size[1])) for c in corners)
    return source, (cols[0], rows[0], cols[1], rows[1])


def _lesions(boxes: list[_Box]) -> list[_Lesion]:
    lesions: list[_Lesion] = []
    for box in sorted(boxes, key=lambda b: -b.probability):
        home = next((lesion for lesion in lesions
                     if any(m.label == box.label and abs(m.source - box.source) <= 1
                            and _iou(m.box, box.box) >= IOU_SAME_LESION
                            for m in lesion.boxes)), None)  # fmt: skip
        if home is None:
            lesions.append(_Lesion([box]))
        else:
            home.boxes.append(box)
    return lesions


def analyse_detections(
    series: LoadedSeries, model: Detector, observation: dict[str, object]
) -> AnalysisResult:
    """Preprocess, detect on every slice, group the boxes into lesions, report per label."""
    m = model.manifest
    pre = preprocess(series, m.input)
    started = time.perf_counter()
    raw = model.detections(pre.array)
    seconds = round(time.perf_counter() - started, 4)
    scores = calibrated(raw[..., 4], m.calibration)
    boxes = []
    for k in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            label_index = int(round(float(raw[k, j, 5])))
            if not 0 <= label_index < len(m.labels):
                continue  # padding, or a class the manifest does not name
            x0, y0, x1, y1 = (float(v) for v in raw[k, j, :4])
            net = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            source, box = _to_source(pre, series, k, net)
            boxes.append(_Box(source, box, float(scores[k, j]), label_index, (k, net)))
    lesions = _lesions(boxes)
    sx, sy = series.image.GetSpacing()[:2]
    findings: list[Finding] = []
    saliency = np.zeros(pre.array.shape, dtype=np.float32)
    height, width = int(pre.array.shape[-2]), int(pre.array.shape[-1])
    for index, label in enumerate(m.labels):
        mine = sorted((lesion for lesion in lesions if lesion.best.label == index),
                      key=lambda lesion: -lesion.best.probability)  # fmt: skip
        present = [lesion for lesion in mine if lesion.best.probability >= m.threshold]
        chosen = present[: m.max_findings] or mine[:1]
        for number, lesion in enumerate(chosen, start=1):
            best = lesion.best
            for member in lesion.boxes:  # the lesion's boxes, as its saliency
                on, (left, top, right, bottom) = member.network
                r0, r1 = max(0, int(top)), min(height, int(np.ceil(bottom)))
                c0, c1 = max(0, int(left)), min(width, int(np.ceil(right)))
                region = saliency[on, r0:r1, c0:c1]
                np.maximum(region, member.probability, out=region)
            c0f, r0f, c1f, r1f = best.box
            findings.append(label.as_finding(
                best.probability, m.threshold,
                location=ImageLocation(
                    sop_instance_uid=series.sop_instance_uids[best.source],
                    sop_class_uid=series.sop_class_uid,
                    point=((c0f + c1f) / 2, (r0f + r1f) / 2), box=best.box,
                    frame_number=(series.frame_numbers[best.source]
                                  if series.frame_numbers is not None else None),
                ),
                lesion=number if present else None,
                diameter_mm=round(max((c1f - c0f) * sx, (r1f - r0f) * sy), 2),
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
            "slices": int(raw.shape[0]), "boxes": len(boxes), "lesions": len(lesions),
            "iou_same_lesion": IOU_SAME_LESION}, "seconds": seconds}],  # fmt: skip
        observation=observation,
    )
