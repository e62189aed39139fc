"""The physician's verified SR: the AI SR's findings as decided, VERIFIED and FINAL."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import NamedTuple, Unpack

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io import codes as sr_codes
from dicom_io.identity import NewObject, identity
from dicom_io.sr.content import (
    ABSENT_KEY,
    COMMENT,
    IMAGE_REGION,
    PIXEL_COLUMNS,
    PIXEL_ROWS,
    PRESENT_KEY,
    REFERENCED_SEGMENT,
    TRACKING_IDENTIFIER,
    TRACKING_UID,
    VERIFIED_SERIES_DESCRIPTION,
    code_value,
    concept_key,
    concept_name,
    image_region,
    inferred_from,
    measurement_groups,
    root_item,
    text_of,
)
from dicom_io.wording import reviewed_label
from model.results import (
    ImageLocation,
)


class ReviewDecision(NamedTuple):
    """A physician's decision on one AI finding (a plain 3-tuple works too).

    A correction is `confirmed` with a `corrected_location`: the finding is
    there, at the place the physician gives.
    """

    tracking_uid: str
    confirmed: bool
    comment: str | None = None
    corrected_location: ImageLocation | None = None


def build_verified_sr(
    ai_sr: Dataset,
    decisions: Sequence[ReviewDecision | tuple[str, bool, str | None]],
    *,
    verifying_observer_name: str,
    verifying_organization: str,
    series_description: str = VERIFIED_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    supersedes: Dataset | None = None,
    **new: Unpack[NewObject],
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
    root = root_item(ai_sr)
    groups = measurement_groups(root)
    if not groups:
        raise ValueError("the SR has no AI findings to review (not a TID 1500 AI result?)")
    uids = [text_of(g, TRACKING_UID) for g in groups]
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
        **identity(new),
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
            if concept_name(item) == TRACKING_IDENTIFIER:
                item.TextValue = f"{item.TextValue} - REJECTED BY REVIEWER"
            elif item.ValueType == "CODE" and code_value(item) in (PRESENT_KEY, ABSENT_KEY):
                flipped = sr_codes.ABSENT if code_value(item) == PRESENT_KEY else sr_codes.PRESENT
                item.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(flipped)]
        whole = _whole_key_image(items, sizes)
        volumetric = _is_volumetric(items)
        items = _without_regions(items)
        if whole is not None:
            items = _with_region(items, whole, inferred_only=volumetric)
        if "ContentTemplateSequence" in group and not volumetric:
            # Without a region the group is a TID 1501 group, and says so. A
            # volumetric group (TID 1411) keeps its segment: the voxels its
            # numbers were measured on, which the reviewer judged (Absent).
            group.ContentTemplateSequence[0].TemplateIdentifier = (
                "1410" if whole is not None else "1501")
    verdict = "confirmed" if decision.confirmed else "rejected"
    items = _with_review_comment(items, f"Reviewer {verdict} the AI finding.", decision.comment)
    group.ContentSequence = items


def _is_volumetric(items: list[Dataset]) -> bool:
    return any(concept_name(i) == REFERENCED_SEGMENT for i in items)


def _with_region(items: list[Dataset], location: ImageLocation, *,
                 inferred_only: bool = False) -> list[Dataset]:  # fmt: skip
    """The group's items with `location` as its Image Region, which the probability NUM
    also points at, so that OHIF tracks it (see ai_result._measurement_group).

    `inferred_only`: in the NUMs alone, as a volumetric group (TID 1411)
    takes it: its region of interest is its segment, and a group with a 2D
    Image Region of its own beside volumetric ones makes template validators
    (PixelMed) read the whole report as planar, failing the others.
    """
    region = image_region(location)
    for item in items:
        if item.ValueType == "NUM" and (
                inferred_only or concept_name(item) == concept_key(sr_codes.PROBABILITY)):
            item.ContentSequence = [*item.get("ContentSequence", []), inferred_from(region)]
    if inferred_only:
        return items
    # TID 1410 row order: the Image Region before the measurements (a
    # template validator reads rows in order, and misses it after them).
    at = next((i for i, item in enumerate(items) if item.ValueType == "NUM"), len(items))
    return [*items[:at], region, *items[at:]]


def _whole_key_image(
    items: list[Dataset], sizes: dict[str, tuple[int, int]]
) -> ImageLocation | None:
    """The whole image the group's region is on, or None (no region, or its size unknown).

    A volumetric group's region is the key image its NUMs were INFERRED FROM.
    """
    nested = [child for item in items if item.ValueType == "NUM"
              for child in item.get("ContentSequence", [])]  # fmt: skip
    for item in [*items, *nested]:
        if item.ValueType == "SCOORD" and concept_name(item) == IMAGE_REGION:
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
            values = {concept_name(c): c.MeasuredValueSequence[0].NumericValue
                      for c in children if c.ValueType == "NUM"}  # fmt: skip
            rows = values.get(concept_key(PIXEL_ROWS))
            columns = values.get(concept_key(PIXEL_COLUMNS))
            if rows is not None and columns is not None:
                uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                sizes[uid] = (int(columns), int(rows))
        stack.extend(children)
    return sizes


def _without_regions(items: list[Dataset]) -> list[Dataset]:
    """The group's items without its Image Region, and its NUMs without theirs."""
    kept = []
    for item in items:
        if item.ValueType in ("SCOORD", "SCOORD3D") and concept_name(item) == IMAGE_REGION:
            continue
        if item.ValueType == "NUM" and "ContentSequence" in item:
            children = [c for c in item.ContentSequence
                        if c.ValueType not in ("SCOORD", "SCOORD3D")]  # fmt: skip
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
        (str(i.TextValue) for i in items if i.ValueType == "TEXT" and concept_name(i) == COMMENT),
        None,
    )
    kept = [i for i in items if not (i.ValueType == "TEXT" and concept_name(i) == COMMENT)]
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
        if concept_name(item) == TRACKING_IDENTIFIER:
            item.TextValue = f"{item.TextValue} - LOCATION CORRECTED BY REVIEWER"
        elif item.ValueType == "CODE" and code_value(item) == ABSENT_KEY:
            item.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(sr_codes.PRESENT)]
    # A volumetric group keeps the segment its numbers were measured on; the
    # reviewer's location is what its NUMs now point at (and OHIF draws).
    volumetric = _is_volumetric(items)
    items = _with_region(_without_regions(items), decision.corrected_location,
                         inferred_only=volumetric)  # fmt: skip
    if "ContentTemplateSequence" in group and not volumetric:
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
