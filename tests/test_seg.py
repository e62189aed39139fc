"""The saliency map as a FRACTIONAL SEG: references, values, validators."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_io.pmap import build_saliency_map
from dicom_io.seg import build_region_seg, build_saliency_seg
from dicom_io.sr import build_ai_result_sr, finding_tracking_uid, read_findings
from dicom_io.synthetic import write_ct_series
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    CodedConcept,
    Finding,
    ImageLocation,
    Outcome,
    SaliencyMap,
)
from tests.dicom_validate import dciodvfy_errors, dsrdump

NODULE = CodedConcept("27925004", "SCT", "Nodule")
LUNG = CodedConcept("39607008", "SCT", "Lung")
ALGORITHM = AlgorithmInfo(
    name="chestnet",
    version="2.1.0",
    manufacturer="secondreader",
    device_uid="2.25.197220393407618049452119130298718434561",
    parameters={"input_size": "128x128"},
)


def _finding(location: ImageLocation | None = None) -> Finding:
    return Finding("nodule", NODULE, LUNG, 0.83, 0.5, location)


def _blob(rows: int, cols: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    r, c = np.mgrid[:rows, :cols]
    dist = np.hypot(r - centre[0], c - centre[1])
    return np.clip(1.0 - dist / radius, 0.0, 1.0).astype(np.float32)


def _frames_by_source(seg: Dataset) -> dict[tuple[str, int | None], np.ndarray]:
    """SEG frames as fractions in [0, 1], keyed by (source SOP UID, source frame)."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    out = {}
    for k, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        frame = source.get("ReferencedFrameNumber")
        key = (source.ReferencedSOPInstanceUID, int(frame) if frame is not None else None)
        out[key] = pixels[k].astype(np.float32) / float(seg.MaximumFractionalValue)
    return out


def _save_valid(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    return pydicom.dcmread(path)


def test_ct_seg_keeps_only_salient_slices(tmp_path: Path) -> None:
    n, rows, cols = 300, 64, 64
    paths = write_ct_series(np.full((n, rows, cols), -1000, np.int16), tmp_path / "ct")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    rng = np.random.default_rng(1)
    frames = (rng.random((n, rows, cols)) * 0.04).astype(np.float32)  # faint noise everywhere
    salient = range(140, 146)
    for k in salient:
        frames[k] = np.maximum(frames[k], _blob(rows, cols, (30, 40), 12.0))
    uids = [h.SOPInstanceUID for h in headers]
    # Given in reverse: the builder must pair frames with images by UID.
    saliency = SaliencyMap(headers[0].SeriesInstanceUID, uids[::-1], frames[::-1].copy())

    started = time.perf_counter()
    seg = build_saliency_seg(saliency, headers, ALGORITHM, _finding(), series_number=950)
    assert time.perf_counter() - started < 20.0
    seg = _save_valid(seg, tmp_path / "seg.dcm")

    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == headers[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert (seg.SegmentationType, seg.SegmentationFractionalType) == ("FRACTIONAL", "PROBABILITY")
    assert int(seg.NumberOfFrames) == len(salient)
    (segment,) = seg.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.value
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.AnatomicRegionSequence[0].CodeValue == LUNG.value
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == ALGORITHM.name
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmVersion == ALGORITHM.version
    assert segment.TrackingUID == finding_tracking_uid(
        headers[0].StudyInstanceUID, ALGORITHM.device_uid, "nodule"
    )
    equipment = [
        e
        for e in seg.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert [e.DeviceUID for e in equipment] == [ALGORITHM.device_uid]

    referenced = {
        i.ReferencedSOPInstanceUID
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert {uids[k] for k in salient} <= referenced
    stored = _frames_by_source(seg)
    assert set(stored) == {(uids[k], None) for k in salient}
    for k in salient:
        expected = np.where(frames[k] >= 0.05, frames[k], 0.0)
        np.testing.assert_allclose(stored[(uids[k], None)], expected, atol=1 / 255 + 1e-6)


def test_cr_seg_and_sr_reference_it(tmp_path: Path) -> None:
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    frames = _blob(cr.Rows, cr.Columns, (800, 900), 150.0)[None]
    saliency = SaliencyMap(cr.SeriesInstanceUID, [cr.SOPInstanceUID], frames)
    location = ImageLocation(cr.SOPInstanceUID, cr.SOPClassUID, (900.5, 800.5))
    finding = _finding(location)
    seg = build_saliency_seg(saliency, [cr], ALGORITHM, finding, series_number=950)
    seg = _save_valid(seg, tmp_path / "cr_seg.dcm")
    assert int(seg.NumberOfFrames) == 1
    assert list(seg.PatientOrientation) == list(cr.PatientOrientation)
    stored = _frames_by_source(seg)[(cr.SOPInstanceUID, None)]
    assert stored[800, 900] == pytest.approx(1.0)
    assert stored[0, 0] == 0.0

    result = AnalysisResult(
        cr.StudyInstanceUID, cr.SeriesInstanceUID, Outcome.ANALYSED, ALGORITHM, [finding]
    )
    sr = build_ai_result_sr(result, [cr], series_number=951, segmentation=seg)
    sr.save_as(tmp_path / "cr_sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "cr_sr.dcm") == []
    assert dsrdump(tmp_path / "cr_sr.dcm").returncode == 0
    evidence = {
        (s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    assert (cr.SeriesInstanceUID, cr.SOPInstanceUID) in evidence
    # The SR group and the SEG segment name the same finding.
    (found,) = read_findings(sr)
    assert found["tracking_uid"] == seg.SegmentSequence[0].TrackingUID


def test_multiframe_seg_references_source_frames(tmp_path: Path) -> None:
    image = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"), stop_before_pixels=True)
    frames = _blob(image.Rows, image.Columns, (200, 250), 60.0)[None]
    saliency = SaliencyMap(image.SeriesInstanceUID, [image.SOPInstanceUID], frames, [2])
    seg = build_saliency_seg(saliency, [image], ALGORITHM, _finding(), series_number=950)
    seg = _save_valid(seg, tmp_path / "mf_seg.dcm")
    assert set(_frames_by_source(seg)) == {(image.SOPInstanceUID, 2)}


def test_invalid_saliency_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(np.full((3, 16, 16), -1000, np.int16), tmp_path / "ct")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    uids = [h.SOPInstanceUID for h in headers]
    series = headers[0].SeriesInstanceUID
    too_big = SaliencyMap(series, uids, np.full((3, 16, 16), 1.5, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_saliency_seg(too_big, headers, ALGORITHM, _finding(), series_number=1)
    wrong_shape = SaliencyMap(series, uids, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="saliency frames are"):
        build_saliency_seg(wrong_shape, headers, ALGORITHM, _finding(), series_number=1)
    faint = SaliencyMap(series, uids, np.full((3, 16, 16), 0.01, np.float32))
    with pytest.raises(ValueError, match="nothing to store"):
        build_saliency_seg(faint, headers, ALGORITHM, _finding(), series_number=1)
    unknown = SaliencyMap(series, ["1.2.3.4"], np.zeros((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="not in source_headers"):
        build_saliency_seg(unknown, headers, ALGORITHM, _finding(), series_number=1)


def test_ct_parametric_map_holds_the_float_saliency(tmp_path: Path) -> None:
    n, rows, cols = 20, 64, 64
    paths = write_ct_series(np.full((n, rows, cols), -1000, np.int16), tmp_path / "ct")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    salient = [8, 9, 10]
    frames = np.stack([_blob(rows, cols, (30, 40), 12.0) * (0.5 + 0.1 * i) for i in range(3)])
    uids = [headers[k].SOPInstanceUID for k in salient]
    saliency = SaliencyMap(headers[0].SeriesInstanceUID, uids[::-1], frames[::-1].copy())
    pm = build_saliency_map(saliency, headers, ALGORITHM, _finding(), series_number=952)
    pm = _save_valid(pm, tmp_path / "pm.dcm")

    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # what OHIF's pmap extension takes
    assert pm.StudyInstanceUID == headers[0].StudyInstanceUID
    # A frame for every image of the series (OHIF's adapter places frames by
    # their image's index in the series), zero where the model saw nothing,
    # and deflated, so those frames cost next to nothing.
    assert "FloatPixelData" in pm and int(pm.NumberOfFrames) == n
    assert pm.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    first, last = (
        mapping.DoubleFloatRealWorldValueFirstValueMapped,
        mapping.DoubleFloatRealWorldValueLastValueMapped,
    )
    assert (first, last) == (0.0, 1.0)
    pixels = pm.pixel_array.reshape(n, rows, cols)
    by_source = {
        g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: pixels[k]
        for k, g in enumerate(pm.PerFrameFunctionalGroupsSequence)
    }
    assert set(by_source) == {h.SOPInstanceUID for h in headers}
    for i, uid in enumerate(uids):
        np.testing.assert_allclose(by_source[uid], frames[i], atol=1e-6)  # float, not 8-bit
    assert not any(
        by_source[h.SOPInstanceUID].any() for h in headers if h.SOPInstanceUID not in uids
    )
    # Frames ascend along the normal (row x column: +z for this axial series),
    # frame k on the k-th image from the bottom, with dimension index k: the
    # order OHIF 3.13.2 uses frames in, whatever their positions say.
    z = [
        float(g.PlanePositionSequence[0].ImagePositionPatient[2])
        for g in pm.PerFrameFunctionalGroupsSequence
    ]
    assert z == sorted(z) and len(set(z)) == n
    bottom_up = sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    for number, (group, header) in enumerate(
        zip(pm.PerFrameFunctionalGroupsSequence, bottom_up, strict=True), start=1
    ):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert list(group.PlanePositionSequence[0].ImagePositionPatient) == list(
            header.ImagePositionPatient
        )
        assert int(group.FrameContentSequence[0].DimensionIndexValues) == number
    equipment = [e.get("DeviceUID") for e in pm.ContributingEquipmentSequence]
    assert ALGORITHM.device_uid in equipment


def test_cr_binary_region_seg_validates(tmp_path: Path) -> None:
    cr = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    frames = _blob(cr.Rows, cr.Columns, (800, 900), 150.0)[None]
    saliency = SaliencyMap(cr.SeriesInstanceUID, [cr.SOPInstanceUID], frames)
    # No frame of reference: highdicom cannot build the map; the reporter
    # sends the BINARY SEG, GSPS and summary image for projection images.
    with pytest.raises(ValueError, match="frame of reference"):
        build_saliency_map(saliency, [cr], ALGORITHM, _finding(), series_number=952)

    seg = build_region_seg(saliency, [cr], ALGORITHM, _finding(), series_number=953)
    seg = _save_valid(seg, tmp_path / "cr_region.dcm")
    assert seg.SegmentationType == "BINARY"
    mask = seg.pixel_array.astype(bool)
    assert set(np.unique(seg.pixel_array)) <= {0, 1}
    # Half the peak: the blob falls linearly to 0 at 150 pixels, so radius 75.
    assert mask[800, 900] and mask[800, 970] and not mask[800, 980]
    (segment,) = seg.SegmentSequence
    assert segment.TrackingUID == finding_tracking_uid(
        cr.StudyInstanceUID, ALGORITHM.device_uid, "nodule"
    )


def test_zero_map_builds_no_parametric_map(tmp_path: Path) -> None:
    paths = write_ct_series(np.full((3, 16, 16), -1000, np.int16), tmp_path / "ct")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    saliency = SaliencyMap(
        headers[0].SeriesInstanceUID, [headers[1].SOPInstanceUID], np.zeros((1, 16, 16), np.float32)
    )
    with pytest.raises(ValueError, match="zero everywhere"):
        build_saliency_map(saliency, headers, ALGORITHM, _finding(), series_number=952)
    with pytest.raises(ValueError, match="zero everywhere"):
        build_region_seg(saliency, headers, ALGORITHM, _finding(), series_number=953)
