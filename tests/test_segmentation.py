"""Segmentation models: label map -> measured regions -> DICOM SEG and TID 1411 volumetric groups.

A TorchScript network that thresholds the windowed CT (soft tissue against
air) stands in for a trained one, so that every number has an analytic
answer: two spheres of known radius in air are two lesions, largest first,
each with its volume, longest axial diameter, CT numbers and key image.
Their SEG has a segment per lesion; the SR has a volumetric group per lesion
that references its segment and carries those measurements, and both pass
dciodvfy and PixelMed's template check with no error. The trained network
of the demonstration bundle is tested in test_segmentation_bundle.py.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from torch import nn

from dicom_io.seg import build_segmentation_seg
from dicom_io.series import LoadedSeries, load_series
from dicom_io.sr import build_ai_result_sr, build_verified_sr, read_findings
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series
from model.manifest import ModelManifest
from model.measure import feret_diameter, measure
from model.registry import load_model
from model.results import AnalysisResult, Outcome
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors

SPACING = (1.25, 0.7, 0.7)  # (slice, row, column) mm
# (centre z, y, x in mm from the first voxel, radius mm), the larger first.
SPHERES = ((50.0, 63.0, 84.0, 10.0), (40.0, 60.0, 40.0, 6.0))


class Threshold(nn.Module):
    """Soft tissue (windowed value above 0.35) is label 1: logits (background 0, label)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 20.0 * (x - 0.35)
        return torch.cat([torch.zeros_like(fg), fg], 1)


class SigmoidThreshold(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x - 0.35)


def model_folder(root: Path, network: nn.Module, **changes: Any) -> Path:
    root.mkdir(parents=True)
    torch.jit.script(network).save(str(root / "model.ts"))
    raw: dict[str, Any] = {
        "name": "threshold-segmenter", "version": "1.0.0", "kind": "segmentation",
        "intended_use": "Test network: thresholds soft tissue. Not for clinical use.",
        "input": {"dims": "3d", "spacing": [2.0, 2.0], "slice_spacing": 2.0,
                  "orientation": "RAS", "layout": "columns_rows", "contrast": "window",
                  "window": [-250.0, 1500.0], "denoise": "none"},
        "inference": {"roi_size": [32, 32, 32], "batch_size": 4},
        "labels": [{"name": "nodule",
                    "finding": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
                    "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}],
        "weights": {"file": "model.ts", "format": "torchscript", "outputs": ["segmentation"],
                    "sha256": hashlib.sha256((root / "model.ts").read_bytes()).hexdigest()},
    }
    for key, value in changes.items():
        raw[key] = raw[key] | value if isinstance(value, dict) and key in raw else value
    ModelManifest.model_validate(raw).write(root / "manifest.toml")
    return root


def sphere_volume(shape: tuple[int, int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """HU: the spheres (40 HU, noisy) in air; and each sphere's voxels."""
    z, y, x = np.indices(shape, dtype=np.float64)
    masks = []
    for cz, cy, cx, r in SPHERES:
        d = np.sqrt((z * SPACING[0] - cz) ** 2 + (y * SPACING[1] - cy) ** 2
                    + (x * SPACING[2] - cx) ** 2)  # fmt: skip
        masks.append(d <= r)
    hu = np.where(np.logical_or.reduce(masks), 40.0, -1000.0)
    hu += np.random.default_rng(0).normal(0.0, 5.0, shape)
    return hu.astype(np.float32), masks


@pytest.fixture(scope="module")
def spheres(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedSeries, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("spheres")
    hu, masks = sphere_volume((72, 160, 160))
    files = write_ct_series(hu, root / "ct", spacing=SPACING)
    return load_series(files), masks


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory,
              spheres: tuple[LoadedSeries, list[np.ndarray]]) -> AnalysisResult:  # fmt: skip
    folder = model_folder(tmp_path_factory.mktemp("m") / "threshold", Threshold())
    return analyse_series(spheres[0], load_model(folder, "cpu"))


def test_feret_diameter_of_a_rectangle_is_its_diagonal_in_mm() -> None:
    plane = np.zeros((20, 30), dtype=bool)
    plane[3:7, 5:15] = True  # 4 rows x 10 columns of pixels
    assert feret_diameter(plane, (0.5, 0.7)) == pytest.approx(math.hypot(4 * 0.5, 10 * 0.7))


def test_a_sphere_measures_its_volume_diameter_and_values() -> None:
    hu, masks = sphere_volume((72, 160, 160))
    geometry = sitk.GetImageFromArray(hu)
    geometry.SetSpacing((SPACING[2], SPACING[1], SPACING[0]))
    r = measure(masks[0], hu, geometry)
    assert r.volume_ml == pytest.approx(4 / 3 * math.pi * 10.0**3 / 1000, rel=0.02)
    # Pixel corners: the true 20 mm, plus at most one pixel's diagonal.
    assert 20.0 <= r.longest_axial_diameter_mm <= 20.0 + math.hypot(0.7, 0.7)
    assert r.mean == pytest.approx(40.0, abs=1.0)
    assert r.key_slice == round(SPHERES[0][0] / SPACING[0])
    assert r.centroid == pytest.approx((84.0 / 0.7 + 0.5, 63.0 / 0.7 + 0.5), abs=0.6)


def test_two_spheres_are_two_lesions_largest_first_measured_on_the_source(
    segmented: AnalysisResult, spheres: tuple[LoadedSeries, list[np.ndarray]]
) -> None:
    series, masks = spheres
    found = [f for f in segmented.findings if f.present]
    assert [f.lesion for f in found] == [1, 2]
    for finding, (cz, cy, cx, r) in zip(found, SPHERES, strict=True):
        truth = 4 / 3 * math.pi * r**3 / 1000
        # The network's 2 mm grid, mapped back by nearest neighbour: a few per cent.
        assert finding.volume_ml == pytest.approx(truth, rel=0.12)
        assert finding.diameter_mm == pytest.approx(2 * r, abs=3.0)
        assert finding.max_intensity is not None and finding.max_intensity > 30.0
        assert finding.location is not None
        key = series.sop_instance_uids.index(finding.location.sop_instance_uid)
        assert abs(key * SPACING[0] - cz) <= 2.0
        col, row = finding.location.point
        assert (col * 0.7, row * 0.7) == pytest.approx((cx, cy), abs=2.0)
    label_map = segmented.label_map
    assert label_map is not None
    # Each lesion's voxels on the source images, as the SEG will hold them.
    index = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    full = np.zeros(masks[0].shape, dtype=np.uint16)
    for uid, frame in zip(label_map.source_sop_instance_uids, label_map.frames, strict=True):
        full[index[uid]] = frame
    for number, mask in enumerate(masks, start=1):
        got = full == segmented.findings.index(found[number - 1]) + 1
        dice = 2 * (got & mask).sum() / (got.sum() + mask.sum())
        assert dice > 0.85


def _objects(result: AnalysisResult, series: LoadedSeries) -> tuple[Dataset, Dataset]:
    headers = series.headers
    algorithm = result.algorithm
    assert algorithm is not None
    seg = build_segmentation_seg(result.label_map, headers, algorithm, result.findings,  # type: ignore[arg-type]
                                 series_number=9908, series_instance_uid=generate_uid(),
                                 sop_instance_uid=generate_uid())  # fmt: skip
    sr = build_ai_result_sr(result, headers, regions=seg, series_number=9901,
                            series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    return seg, sr


def test_the_seg_has_a_segment_per_lesion_and_the_sr_a_volumetric_group_referencing_it(
    segmented: AnalysisResult, spheres: tuple[LoadedSeries, list[np.ndarray]], tmp_path: Path
) -> None:
    seg, sr = _objects(segmented, spheres[0])
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert pixelmed_sr_errors(tmp_path / "sr.dcm") == []

    read_seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert read_seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert [d.segment_label for d in read_seg.SegmentSequence] == ["AI nodule 1", "AI nodule 2"]
    report = hd.sr.srread(tmp_path / "sr.dcm")
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    present = [f for f in segmented.findings if f.present]
    for number, (group, finding) in enumerate(zip(groups, present, strict=True), start=1):
        segment = group.referenced_segment
        assert isinstance(segment, hd.sr.ReferencedSegment)
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers == [number]
        # The segment and the group are one finding: the same Tracking UID.
        described = read_seg.get_segment_description(number)
        assert described.tracking_uid == group.tracking_uid
        values = {(m.name.value, m.derivation.value if m.derivation else None): m.value
                  for m in group.get_measurements()}  # fmt: skip
        assert values[("118565006", None)] == pytest.approx(finding.volume_ml)
        assert values[("103339001", None)] == pytest.approx(finding.diameter_mm)
        assert values[("112031", "373098007")] == pytest.approx(finding.mean_intensity)
        assert values[("112031", "56851009")] == pytest.approx(finding.max_intensity)
        # The SEG holds exactly the voxels the volume was measured on.
        frames = np.asarray(read_seg.pixel_array)
        frames = frames[..., None] if frames.ndim == 3 else frames
        in_segment = sum(int(frames[i].sum()) for i, item in
                         enumerate(read_seg.PerFrameFunctionalGroupsSequence)
                         if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
                         == number)  # fmt: skip
        z, y, x = (s for s in reversed(spheres[0].image.GetSpacing()))
        assert in_segment * x * y * z / 1000 == pytest.approx(finding.volume_ml, abs=5e-4)


def test_a_structure_label_is_one_finding_and_a_sigmoid_its_own_threshold(
    spheres: tuple[LoadedSeries, list[np.ndarray]], tmp_path: Path
) -> None:
    series, masks = spheres
    labels = [{"name": "tissue", "segment_as": "structure",
               "finding": {"value": "85756007", "scheme": "SCT", "meaning": "Tissue"},
               "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}]
    folder = model_folder(tmp_path / "sigmoid", SigmoidThreshold(), labels=labels,
                          segmentation={"activation": "sigmoid"}, threshold=0.5)
    result = analyse_series(series, load_model(folder, "cpu"))
    (finding,) = result.findings
    assert finding.present and finding.lesion is None
    truth = sum(4 / 3 * math.pi * r**3 / 1000 for *_, r in SPHERES)
    assert finding.volume_ml == pytest.approx(truth, rel=0.12)


def test_a_foreground_crop_gives_the_same_regions(
    segmented: AnalysisResult, spheres: tuple[LoadedSeries, list[np.ndarray]], tmp_path: Path
) -> None:
    folder = model_folder(tmp_path / "crop", Threshold(),
                          input={"crop_foreground": True, "crop_margin": 2})
    cropped = analyse_series(spheres[0], load_model(folder, "cpu"))
    assert [(f.volume_ml, f.diameter_mm, f.location) for f in cropped.findings] == [
        (f.volume_ml, f.diameter_mm, f.location) for f in segmented.findings]
    step = next(s for s in cropped.provenance if s["name"] == "segmentation")
    assert step["parameters"]["regions"] == 2  # type: ignore[index]


@pytest.mark.parametrize(("changes", "says"), [
    ({"input": {"dims": "2d"}}, "segmentation model reads 3d input"),
    ({"inference": {"roi_size": None}}, "needs inference.roi_size"),
    ({"input": {"slice_spacing": None}}, "needs spacing and slice_spacing"),
    ({"weights": {"outputs": ["segmentation", "cam"]}}, "one 'segmentation' output alone"),
])  # fmt: skip
def test_a_manifest_that_does_not_fit_a_segmentation_is_refused(
    tmp_path: Path, changes: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        model_folder(tmp_path / "bad", Threshold(), **changes)


def test_the_verified_sr_of_a_segmentation_validates_and_draws_no_rejected_region(
    segmented: AnalysisResult, spheres: tuple[LoadedSeries, list[np.ndarray]], tmp_path: Path
) -> None:
    seg, sr = _objects(segmented, spheres[0])
    first, second = (f for f in read_findings(sr) if f["present"])
    assert (first["segment_number"], second["segment_number"]) == (1, 2)
    assert first["segmentation_sop_instance_uid"] == seg.SOPInstanceUID
    assert first["volume_ml"] == pytest.approx(segmented.findings[0].volume_ml)
    decisions = [(str(f["tracking_uid"]), f["tracking_uid"] != second["tracking_uid"], None)
                 for f in read_findings(sr)]
    verified = build_verified_sr(sr, decisions, verifying_observer_name="Reader^Rita",
                                 verifying_organization="Test hospital", series_number=9903,
                                 series_instance_uid=generate_uid(),
                                 sop_instance_uid=generate_uid())  # fmt: skip
    verified.save_as(tmp_path / "verified.dcm")
    assert dciodvfy_errors(tmp_path / "verified.dcm") == []
    assert pixelmed_sr_errors(tmp_path / "verified.dcm") == []
    kept, rejected = (f for f in read_findings(verified)
                      if f["tracking_uid"] in (first["tracking_uid"], second["tracking_uid"]))
    assert kept["segment_number"] == 1 and kept["present"]
    # Rejected: absent; the numbers still say which voxels they were measured on (the
    # segment), but what a viewer draws is the whole key image, not the AI's spot.
    assert rejected["segment_number"] == 2 and rejected["present"] is False
    header = next(h for h in spheres[0].headers
                  if h.SOPInstanceUID == rejected["referenced_sop_instance_uid"])
    assert rejected["graphic_data"] is not None
    assert max(c for c, _ in rejected["graphic_data"]) == float(header.Columns)


def test_the_workers_analyser_runs_a_segmentation_model(tmp_path: Path) -> None:
    """What `secondreader serve` runs: the configured models behind the worker's batch size."""
    from daemon.stages.analyse.analyser import ModelAnalyser

    hu, _ = sphere_volume((72, 160, 160))
    files = write_ct_series(hu, tmp_path / "ct", spacing=SPACING)
    folder = model_folder(tmp_path / "threshold", Threshold())
    study = str(load_series(files).study_instance_uid)
    [result] = ModelAnalyser([folder], device="cpu").analyse(study, {"s": files})
    assert result.outcome == Outcome.ANALYSED, result.reason
    assert [f.lesion for f in result.findings if f.present] == [1, 2]
    assert result.label_map is not None
