"""Projection studies (CR, DX, MG): every image analysed, findings per side, views named.

A chest radiograph study has a PA and a lateral; a screening mammogram has
CC and MLO views of each breast. Each image is analysed on its own (the
model is 2D), and its findings are grouped by the image's laterality: one
finding per label and side (per breast), or per label where the images have
no side (a chest). A group's probability is its most suspicious image's,
whose view and location the finding carries; `views` names every image of
the group where the finding is present, so a reader sees it was found on
both the CC and the MLO, or on one only.

View and laterality come from the header: View Position (0018,5101), else
the View Code Sequence's meaning; Image Laterality (0020,0062), else the
series' Laterality (0020,0060). An image whose laterality is stated as both
("B") or not at all joins the side-less group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pydicom.dataset import Dataset

from dicom_io.codes import VIEW_CODES
from dicom_io.series import LoadedSeries
from model.results import AnalysisResult, Finding, Outcome

# View Code Sequence values to the short names View Position uses.
_VIEW_BY_CODE = {value: name for name, (value, _) in VIEW_CODES.items()}


def image_laterality(header: Dataset) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(header.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def image_view(header: Dataset) -> str | None:
    view = str(header.get("ViewPosition", "") or "").strip().upper()
    if view:
        return view
    codes: Any = header.get("ViewCodeSequence") or []
    for item in codes:
        value = str(item.get("CodeValue", "") or "")
        if value in _VIEW_BY_CODE:
            return _VIEW_BY_CODE[value]
        meaning = str(item.get("CodeMeaning", "") or "").strip()
        if meaning:
            return meaning
    return None


def view_name(header: Dataset) -> str:
    """"R CC", "PA", or "image N" when the header says neither."""
    side, view = image_laterality(header), image_view(header)
    if view is None:
        view = f"image {header.get('InstanceNumber', '') or '?'}".strip()
    return f"{side} {view}" if side else view


def combine(images: Sequence[LoadedSeries], results: Sequence[AnalysisResult]) -> AnalysisResult:
    """One result for the study from each image's ANALYSED result (same model, same order)."""
    if not results or len(images) != len(results):
        raise ValueError("one analysed result per image")
    headers = [image.headers[0] if image.headers else Dataset() for image in images]
    sides = [image_laterality(h) for h in headers]
    names = [view_name(h) for h in headers]
    findings: list[Finding] = []
    for index in range(len(results[0].findings)):
        for side in dict.fromkeys(sides):  # in order of first appearance
            group = [i for i, s in enumerate(sides) if s == side]
            key = max(group, key=lambda i: results[i].findings[index].probability)
            best = results[key].findings[index]
            present_on = tuple(names[i] for i in group if results[i].findings[index].present)
            findings.append(replace(best, laterality=side, view=names[key], views=present_on))
    # The saliency objects show the image of the most suspicious finding.
    top = max(range(len(results)), key=lambda i: max(
        (f.probability for f in results[i].findings), default=0.0))  # fmt: skip
    first = results[top]
    provenance: list[dict[str, object]] = [*first.provenance, {
        "name": "projections",
        "parameters": {
            "images": [
                {"view": names[i], "sop_instance_uids": images[i].sop_instance_uids[:1],
                 "probabilities": {f.label: round(f.probability, 4) for f in r.findings}}
                for i, r in enumerate(results)
            ],
            "grouped_by": "laterality",
        },
        "seconds": None,
    }]  # fmt: skip
    return AnalysisResult(
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        outcome=Outcome.ANALYSED,
        algorithm=first.algorithm,
        findings=findings,
        saliency=first.saliency,
        provenance=provenance,
        observation=first.observation,
    )
