""""AI NOT RUN": the SR that says no AI result exists for the study, and why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack, cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io import codes as sr_codes
from dicom_io.identity import NewObject, identity
from dicom_io.sr.content import (
    AI_NOT_RUN_SERIES_DESCRIPTION,
    algorithm_equipment,
    check_same_study,
    device_observation_context,
)
from model.results import (
    AlgorithmInfo,
    Outcome,
)


def build_not_run_sr(
    study_headers: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo | None,
    *,
    outcome: Outcome,
    series_description: str = AI_NOT_RUN_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    predecessor: Dataset | None = None,
    **new: Unpack[NewObject],
) -> hd.sr.Comprehensive3DSR:
    """A short SR saying that no AI result exists for the study, and why.

    Not a TID 1500 report: there is nothing measured. The title ("AI analysis
    not performed") and a plain-text summary are what any SR viewer shows.
    `study_headers` are images of the study (all of them or a few): they give
    patient and study and are listed as evidence.
    """
    if outcome == Outcome.ANALYSED:
        raise ValueError("an analysed result goes in build_ai_result_sr")
    if not reason.strip():
        raise ValueError("say why the AI did not run")
    headers = check_same_study(study_headers, None)
    root = hd.sr.ContainerContentItem(name=sr_codes.AI_NOT_PERFORMED)
    items: list[hd.sr.ContentItem] = []
    if algorithm is not None:
        items.extend(cast(list[hd.sr.ContentItem], device_observation_context(algorithm)))
    items.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=sr_codes.procedure_for_modality(str(headers[0].Modality)),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    outcome_code = {
        Outcome.FAILED_QC: sr_codes.OUTCOME_FAILED_QC,
        Outcome.FAILED: sr_codes.OUTCOME_FAILED,
    }.get(outcome, sr_codes.OUTCOME_NOT_APPLICABLE)
    items.append(
        hd.sr.CodeContentItem(
            name=sr_codes.AI_OUTCOME,
            value=outcome_code,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=sr_codes.SUMMARY,
            value=(
                "AI analysis was NOT performed on this study. No AI result exists: "
                "the absence of AI findings does not mean the study is negative."
            ),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    items.append(
        hd.sr.TextContentItem(
            name=sr_codes.COMMENT,
            value=f"Reason: {reason.strip()}",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=root,
        **identity(new),
        series_description=series_description,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        # PARTIAL: the analysis the study was sent for is absent, so nothing
        # that filters on COMPLETE can mistake this for a full AI report.
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=[algorithm_equipment(algorithm)] if algorithm else None,
        coding_schemes=[sr_codes.PRIVATE_SCHEME_ITEM, sr_codes.IHE_SCHEME_ITEM],
    )
