"""The AI result, not-run and verified SRs: content tree, validators, round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from dicom_io.sr import (
    AI_RESULT_SERIES_DESCRIPTION,
    ReviewDecision,
    build_ai_result_sr,
    build_not_run_sr,
    build_verified_sr,
    finding_tracking_uid,
    read_findings,
)
from dicom_io.synthetic import write_ct_series
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
)
from tests.dicom_validate import dciodvfy_errors, dciodvfy_output, dsrdump, pixelmed_sr_errors

NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung")
EFFUSION = CodedConcept("60046008", "SCT", "Pleural effusion")
PLEURA = CodedConcept("3120008", "SCT", "Pleural membrane structure")
PRESENT = ("52101004", "SCT")
ABSENT = ("272519000", "SCT")

ALGORITHM = AlgorithmInfo(
    name="chestnet",
    version="2.1.0",
    manufacturer="secondreader",
    device_uid="2.25.197220393407618049452119130298718434561",
    parameters={"input_size": "128x128", "window": "-400/1500"},
)


@pytest.fixture(scope="module")
def ct_headers(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    volume = np.full((12, 32, 32), -1000, dtype=np.int16)
    paths = write_ct_series(volume, tmp_path_factory.mktemp("ct"))
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def cr_header() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)


def _ct_result(headers: list[Dataset], nodule_p: float, effusion_p: float) -> AnalysisResult:
    key, other = headers[7], headers[3]
    return AnalysisResult(
        study_instance_uid=key.StudyInstanceUID,
        series_instance_uid=key.SeriesInstanceUID,
        outcome=Outcome.ANALYSED,
        algorithm=ALGORITHM,
        findings=[
            Finding(
                "nodule",
                NODULE,
                LUNG,
                nodule_p,
                0.5,
                ImageLocation(
                    key.SOPInstanceUID, key.SOPClassUID, (14.5, 12.5), box=(10.0, 8.0, 19.0, 17.0)
                ),
            ),
            Finding(
                "effusion",
                EFFUSION,
                PLEURA,
                effusion_p,
                0.4,
                ImageLocation(other.SOPInstanceUID, other.SOPClassUID, (3.5, 28.5)),
            ),
        ],
    )


def _save_valid(ds: Dataset, path: Path) -> Dataset:
    """Save, check with dciodvfy and dsrdump, and read back from the file."""
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dumped = dsrdump(path)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stdout.strip()
    return pydicom.dcmread(path)


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def _children(item: Dataset, value: str, scheme: str = "DCM") -> list[Dataset]:
    return [c for c in item.get("ContentSequence", []) if _concept(c) == (value, scheme)]


def _groups(sr: Dataset) -> list[Dataset]:
    (measurements,) = _children(sr, "126010")
    return _children(measurements, "125007")


def _library(sr: Dataset) -> dict[str, int]:
    """Image Library entries: SOP Instance UID -> number of descriptor items."""
    (library,) = _children(sr, "111028")
    return {
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: len(
            image.get("ContentSequence", [])
        )
        for group in _children(library, "126200")
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    }


def _library_uids(sr: Dataset) -> set[str]:
    return set(_library(sr))


def test_positive_ct_sr_content_tree(ct_headers: list[Dataset], tmp_path: Path) -> None:
    result = _ct_result(ct_headers, nodule_p=0.8731, effusion_p=0.12)
    sr = _save_valid(build_ai_result_sr(result, ct_headers, series_number=901), tmp_path / "sr.dcm")

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == result.study_instance_uid
    assert sr.SeriesInstanceUID != result.series_instance_uid
    assert sr.SeriesDescription == AI_RESULT_SERIES_DESCRIPTION
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY", "UNVERIFIED", "COMPLETE",
    )  # fmt: skip
    assert _concept(sr) == ("126000", "DCM")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # Observer: the algorithm as device.
    device_uid = [i for i in sr.ContentSequence if _concept(i) == ("121012", "DCM")]
    assert [str(i.UID) for i in device_uid] == [ALGORITHM.device_uid]
    (procedure,) = _children(sr, "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CID 100
    library = _library(sr)
    # The findings' key images, with full descriptors (position, spacing, ...);
    # every analysed image is in the evidence.
    key_images = {f.location.sop_instance_uid for f in result.findings}
    assert set(library) == key_images
    assert all(library[uid] >= 10 for uid in key_images)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {h.SOPInstanceUID for h in ct_headers}

    groups = _groups(sr)
    assert len(groups) == len(result.findings)
    for group, finding in zip(groups, result.findings, strict=True):
        (tracking_id,) = _children(group, "112039")
        (tracking_uid,) = _children(group, "112040")
        assert tracking_id.TextValue == f"AI {finding.label}"
        assert (
            finding_tracking_uid(result.study_instance_uid, ALGORITHM.device_uid, finding.label)
            == tracking_uid.UID
        )
        (finding_type,) = _children(group, "121071")
        assert finding_type.ConceptCodeSequence[0].CodeValue == finding.finding_type.value
        (site,) = _children(group, "363698007", "SCT")
        assert site.ConceptCodeSequence[0].CodeValue == finding.finding_site.value
        (evaluation,) = _children(group, finding.finding_type.value, "SCT")
        code = evaluation.ConceptCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == (
            PRESENT if finding.present else ABSENT
        )
        (probability,) = _children(group, "122157")
        value = probability.MeasuredValueSequence[0]
        # In percent, so that a viewer printing "value unit" shows "87.31 %".
        assert float(value.NumericValue) == pytest.approx(100 * finding.probability, abs=1e-6)
        unit = value.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("%", "UCUM")
        # The group names the algorithm; a located finding's NUM too (TID 300).
        (group_algorithm,) = _children(group, "111001")
        assert group_algorithm.TextValue == ALGORITHM.name
        (algorithm_name,) = _children(probability, "111001")
        assert algorithm_name.TextValue == ALGORITHM.name
        # The label OHIF shows: the group's Comment, in words, marked NOT VERIFIED.
        (comment,) = _children(group, "121106")
        state = "present" if finding.present else "absent"
        assert comment.TextValue.startswith(
            f"AI, NOT VERIFIED: {finding.finding_type.meaning} {state}, "
        )
        assert "NOT VERIFIED" in comment.TextValue
        assert f"{ALGORITHM.name} {ALGORITHM.version}" in comment.TextValue
        # Every group has an image region (OHIF 3.13.2 needs one in each):
        # the present finding's box; for the absent one, its whole key image
        # (32 x 32 here), which points at no spot.
        (region,) = _children(group, "111030")
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == finding.location.sop_instance_uid
        assert region.GraphicType == "POLYLINE"
        assert list(region.GraphicData) == (
            [10, 8, 19, 8, 19, 17, 10, 17, 10, 8]
            if finding.present
            else [0, 0, 32, 0, 32, 32, 0, 32, 0, 0]
        )
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1410"
        # What the cornerstone adapters (OHIF) hydrate: the first NUM's
        # content holds the SCOORD, INFERRED FROM, with its SELECTED FROM image.
        (inferred,) = [i for i in probability.ContentSequence if i.ValueType == "SCOORD"]
        assert inferred.RelationshipType == "INFERRED FROM"
        assert list(inferred.GraphicData) == list(region.GraphicData)
        (source,) = inferred.ContentSequence
        assert (source.ValueType, source.RelationshipType) == ("IMAGE", "SELECTED FROM")
        assert (
            source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == finding.location.sop_instance_uid
        )

    # IHE AIR: the algorithm in Contributing Equipment, with its Device UID.
    (equipment,) = [
        e
        for e in sr.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    purpose = equipment.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "99IHE", "Processing Algorithm",
    )  # fmt: skip
    assert equipment.Manufacturer == ALGORITHM.manufacturer
    assert equipment.ManufacturerModelName == ALGORITHM.name
    assert equipment.SoftwareVersions == ALGORITHM.version
    assert equipment.DeviceUID == ALGORITHM.device_uid
    # PixelMed walks the tree against TID 1500 and its context groups.
    assert pixelmed_sr_errors(tmp_path / "sr.dcm") == []


def test_negative_study_reports_every_finding_absent(
    ct_headers: list[Dataset], tmp_path: Path
) -> None:
    result = _ct_result(ct_headers, nodule_p=0.03, effusion_p=0.2)
    sr = _save_valid(build_ai_result_sr(result, ct_headers, series_number=901), tmp_path / "n.dcm")
    found = read_findings(sr)
    assert [f["present"] for f in found] == [False, False]
    assert [f["probability"] for f in found] == pytest.approx([0.03, 0.2])
    # Each absent finding is drawn as its whole key image, never as a spot.
    whole = [(0.0, 0.0), (32.0, 0.0), (32.0, 32.0), (0.0, 32.0), (0.0, 0.0)]
    assert [f["graphic_data"] for f in found] == [whole, whole]
    assert [f["referenced_sop_instance_uid"] for f in found] == [
        f.location.sop_instance_uid for f in result.findings
    ]
    assert all(len(_children(g, "112040")) == 1 for g in _groups(sr))
    # TID 1500 as PixelMed reads it: no error (its warnings are about the
    # qualitative evaluation and the Comment, which its TID 1410 lacks).
    assert pixelmed_sr_errors(tmp_path / "n.dcm") == []


def test_findings_without_location_keep_groups_without_region(
    ct_headers: list[Dataset], tmp_path: Path
) -> None:
    # A model that gives no saliency (TorchScript) locates nothing.
    result = _ct_result(ct_headers, nodule_p=0.8, effusion_p=0.1)
    result.findings = [replace(f, location=None) for f in result.findings]
    sr = _save_valid(build_ai_result_sr(result, ct_headers, series_number=901), tmp_path / "l.dcm")
    for group in _groups(sr):
        assert _children(group, "111030") == []
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    assert [f["present"] for f in read_findings(sr)] == [True, False]
    assert pixelmed_sr_errors(tmp_path / "l.dcm") == []


def test_cr_sr_with_point(cr_header: Dataset, tmp_path: Path) -> None:
    location = ImageLocation(cr_header.SOPInstanceUID, cr_header.SOPClassUID, (900.5, 700.5))
    result = AnalysisResult(
        cr_header.StudyInstanceUID,
        cr_header.SeriesInstanceUID,
        Outcome.ANALYSED,
        ALGORITHM,
        [Finding("nodule", NODULE, LUNG, 0.91, 0.5, location)],
    )
    sr = _save_valid(build_ai_result_sr(result, [cr_header], series_number=77), tmp_path / "cr.dcm")
    (procedure,) = _children(sr, "121058")
    # CID 100's "Imaging procedure": in every edition validators carry.
    assert procedure.ConceptCodeSequence[0].CodeValue == "363679005"
    assert pixelmed_sr_errors(tmp_path / "cr.dcm") == []
    assert _library_uids(sr) == {cr_header.SOPInstanceUID}
    (found,) = read_findings(sr)
    assert found["graphic_type"] == "POINT"
    assert found["graphic_data"] == [(900.5, 700.5)]
    assert found["referenced_sop_instance_uid"] == cr_header.SOPInstanceUID


def test_multiframe_source_references_the_frame(tmp_path: Path) -> None:
    image = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"), stop_before_pixels=True)
    location = ImageLocation(image.SOPInstanceUID, image.SOPClassUID, (20.0, 30.0), frame_number=2)
    result = AnalysisResult(
        image.StudyInstanceUID,
        image.SeriesInstanceUID,
        Outcome.ANALYSED,
        ALGORITHM,
        [Finding("nodule", NODULE, LUNG, 0.66, 0.5, location)],
    )
    sr = _save_valid(build_ai_result_sr(result, [image], series_number=5), tmp_path / "mf.dcm")
    (found,) = read_findings(sr)
    assert found["referenced_frame_numbers"] == [2]
    assert found["referenced_sop_instance_uid"] == image.SOPInstanceUID


def test_read_findings_round_trip(ct_headers: list[Dataset], tmp_path: Path) -> None:
    result = _ct_result(ct_headers, nodule_p=0.77, effusion_p=0.61)
    path = tmp_path / "sr.dcm"
    build_ai_result_sr(result, ct_headers, series_number=901).save_as(path)
    found = read_findings(pydicom.dcmread(path))
    assert len(found) == len(result.findings)
    for got, finding in zip(found, result.findings, strict=True):
        assert got["finding_type"] == finding.finding_type
        assert got["finding_site"] == finding.finding_site
        assert got["present"] is finding.present
        assert got["probability"] == pytest.approx(finding.probability)
        assert got["referenced_sop_instance_uid"] == finding.location.sop_instance_uid
        assert got["tracking_uid"] == finding_tracking_uid(
            result.study_instance_uid, ALGORITHM.device_uid, finding.label
        )
    assert found[1]["graphic_data"] == [result.findings[1].location.point]

    # highdicom reads it back as a TID 1500 report with two planar ROI groups.
    parsed = hd.sr.srread(path)
    groups = parsed.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    assert {str(g.tracking_uid) for g in groups} == {f["tracking_uid"] for f in found}


def test_not_run_sr(ct_headers: list[Dataset], tmp_path: Path) -> None:
    reason = "Slice 5 of 12 is missing; the series cannot be analysed."
    sr = build_not_run_sr(
        ct_headers, reason, ALGORITHM, outcome=Outcome.FAILED_QC, series_number=902
    )
    sr = _save_valid(sr, tmp_path / "not_run.dcm")
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "AI analysis not performed"
    assert sr.SeriesDescription.startswith("AI NOT RUN")
    assert sr.CompletionFlag == "PARTIAL"
    texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
    assert any(reason in t for t in texts)
    assert any("does not mean the study is negative" in t for t in texts)
    (outcome,) = [
        i for i in sr.ContentSequence if i.ValueType == "CODE" and _concept(i)[0] == "AI-OUTCOME"
    ]
    assert outcome.ConceptCodeSequence[0].CodeValue == "FAILED-QC"
    assert "99SECONDREADER" in {
        i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence
    }
    assert read_findings(sr) == []
    dumped = dsrdump(tmp_path / "not_run.dcm").stdout
    assert "AI analysis not performed" in dumped
    # No template to follow (nothing was measured): PixelMed finds no error in it either.
    assert pixelmed_sr_errors(tmp_path / "not_run.dcm", template=False) == []


def test_not_run_sr_without_algorithm(cr_header: Dataset, tmp_path: Path) -> None:
    sr = build_not_run_sr(
        [cr_header], "No model applies to CR of the knee.", None,
        outcome=Outcome.NOT_APPLICABLE, series_number=902,
    )  # fmt: skip
    sr = _save_valid(sr, tmp_path / "na.dcm")
    (outcome,) = [i for i in sr.ContentSequence if _concept(i)[0] == "AI-OUTCOME"]
    assert outcome.ConceptCodeSequence[0].CodeValue == "NOT-APPLICABLE"
    assert not [i for i in sr.ContentSequence if i.RelationshipType == "HAS OBS CONTEXT"]


def test_verified_sr(ct_headers: list[Dataset], tmp_path: Path) -> None:
    result = _ct_result(ct_headers, nodule_p=0.9, effusion_p=0.7)
    ai_sr = _save_valid(
        build_ai_result_sr(result, ct_headers, series_number=901), tmp_path / "a.dcm"
    )
    nodule_uid, effusion_uid = (f["tracking_uid"] for f in read_findings(ai_sr))
    verified = build_verified_sr(
        ai_sr,
        [
            ReviewDecision(nodule_uid, confirmed=False, comment="Vessel in cross-section."),
            (effusion_uid, True, None),
        ],
        verifying_observer_name="Reader^Rita",
        verifying_organization="Radiology Department",
        series_number=903,
    )
    verified = _save_valid(verified, tmp_path / "v.dcm")
    assert (verified.VerificationFlag, verified.PreliminaryFlag, verified.CompletionFlag) == (
        "VERIFIED", "FINAL", "COMPLETE",
    )  # fmt: skip
    assert verified.VerifyingObserverSequence[0].VerifyingObserverName == "Reader^Rita"
    predecessor = verified.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ai_sr.SOPInstanceUID
    assert verified.StudyInstanceUID == ai_sr.StudyInstanceUID
    assert verified.StudyDescription == ai_sr.StudyDescription
    assert _library_uids(verified) == _library_uids(ai_sr)
    person = [i for i in verified.ContentSequence if _concept(i) == ("121008", "DCM")]
    assert [str(i.PersonName) for i in person] == ["Reader^Rita"]
    assert any(
        e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        for e in verified.ContributingEquipmentSequence
    )

    rejected, confirmed = read_findings(verified)
    assert rejected["tracking_uid"] == nodule_uid
    assert rejected["present"] is False
    assert "REJECTED" in rejected["tracking_identifier"]
    # No spot for a rejected finding: its whole key image, as the AI SR frames an absent one
    # (OHIF needs a region in every group, or its SR viewport stops).
    key = next(h for h in ct_headers if h.SOPInstanceUID == rejected["referenced_sop_instance_uid"])
    columns, rows = float(key.Columns), float(key.Rows)
    assert rejected["graphic_data"] == [(0.0, 0.0), (columns, 0.0), (columns, rows), (0.0, rows),
                                        (0.0, 0.0)]  # fmt: skip
    assert rejected["referenced_sop_instance_uid"] == result.findings[0].location.sop_instance_uid
    assert rejected["probability"] == pytest.approx(0.9)  # the AI's number, kept
    assert "Vessel in cross-section." in rejected["comment"]
    # The physician's decision replaces the AI's NOT VERIFIED.
    assert "NOT VERIFIED" not in rejected["comment"] + confirmed["comment"]
    assert confirmed["tracking_uid"] == effusion_uid
    assert confirmed["present"] is True
    assert confirmed["graphic_data"] == [result.findings[1].location.point]
    assert "confirmed" in confirmed["comment"]
    # highdicom reads both as planar groups (TID 1410), each with its region.
    parsed = hd.sr.srread(tmp_path / "v.dcm").content
    planar = parsed.get_planar_roi_measurement_groups()
    assert [str(g.tracking_uid) for g in planar] == [nodule_uid, effusion_uid]
    assert parsed.get_image_measurement_groups() == []
    assert pixelmed_sr_errors(tmp_path / "v.dcm") == []
    # The AI SR itself is untouched.
    assert [f["present"] for f in read_findings(ai_sr)] == [True, True]


def test_verified_sr_needs_a_decision_for_every_finding(ct_headers: list[Dataset]) -> None:
    ai_sr = build_ai_result_sr(_ct_result(ct_headers, 0.9, 0.7), ct_headers, series_number=901)
    first = read_findings(ai_sr)[0]["tracking_uid"]
    with pytest.raises(ValueError, match="missing"):
        build_verified_sr(
            ai_sr, [(first, True, None)], verifying_observer_name="Reader^Rita",
            verifying_organization="Radiology", series_number=903,
        )  # fmt: skip


def test_verified_sr_refuses_a_not_run_sr(ct_headers: list[Dataset]) -> None:
    not_run = build_not_run_sr(
        ct_headers, "No model applies.", None, outcome=Outcome.NOT_APPLICABLE, series_number=9
    )
    with pytest.raises(ValueError, match="no AI findings"):
        build_verified_sr(
            not_run, [], verifying_observer_name="Reader^Rita",
            verifying_organization="Radiology", series_number=903,
        )  # fmt: skip


def test_rerun_supersedes_predecessor(ct_headers: list[Dataset], tmp_path: Path) -> None:
    first = build_ai_result_sr(_ct_result(ct_headers, 0.55, 0.1), ct_headers, series_number=901)
    second = build_ai_result_sr(
        _ct_result(ct_headers, 0.81, 0.1), ct_headers, series_number=901, predecessor=first
    )
    second = _save_valid(second, tmp_path / "second.dcm")
    ref = second.PredecessorDocumentsSequence[0]
    assert ref.StudyInstanceUID == first.StudyInstanceUID
    assert ref.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    sop = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    # Same model, same study: the findings keep their Tracking UIDs.
    assert [f["tracking_uid"] for f in read_findings(second)] == [
        f["tracking_uid"] for f in read_findings(first)
    ]
    assert read_findings(second)[0]["probability"] == pytest.approx(0.81)


def test_dciodvfy_helper_reports_errors(tmp_path: Path) -> None:
    (path,) = write_ct_series(np.zeros((1, 8, 8), np.int16), tmp_path / "ct")
    broken = pydicom.dcmread(path)
    del broken.Modality  # Type 1 in General Series
    broken.save_as(tmp_path / "broken.dcm")
    new_errors = set(dciodvfy_errors(tmp_path / "broken.dcm")) - set(dciodvfy_errors(path))
    assert any("Modality" in e for e in new_errors)
    assert not any(line.startswith("Error") for line in dciodvfy_output(path) if "Modality" in line)


def test_invalid_inputs_are_refused(ct_headers: list[Dataset], cr_header: Dataset) -> None:
    result = _ct_result(ct_headers, 0.9, 0.1)
    with pytest.raises(ValueError, match="not in source_headers"):
        build_ai_result_sr(result, ct_headers[:5], series_number=1)
    with pytest.raises(ValueError, match="another study"):
        build_ai_result_sr(result, [*ct_headers, cr_header], series_number=1)
    failed = AnalysisResult(result.study_instance_uid, None, Outcome.FAILED_QC, None, reason="x")
    with pytest.raises(ValueError, match="build_not_run_sr"):
        build_ai_result_sr(failed, ct_headers, series_number=1)
    with pytest.raises(ValueError, match="build_ai_result_sr"):
        build_not_run_sr(ct_headers, "x", ALGORITHM, outcome=Outcome.ANALYSED, series_number=1)
