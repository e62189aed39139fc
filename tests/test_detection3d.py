"""3D detection models: boxes in the volume, placed on the source images and in patient mm.

A TorchScript network that boxes the brightest voxel of the volume, and then
the brightest voxel away from that box, stands in for a trained detector:
two spheres of known centre in air are two lesions, the more suspicious
first, each on the source image nearest its centre, with its box there (for
GSPS and summary) and its section in that image's plane in patient
coordinates, which the SR carries as a SCOORD3D. The SR passes dciodvfy and
PixelMed's template check, as does the verified SR that rejects one lesion.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid
from torch import nn

from dicom_io.series import LoadedSeries, load_series
from dicom_io.sr import build_ai_result_sr, build_verified_sr, read_findings
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series
from model.manifest import ModelManifest
from model.registry import load_model
from model.results import AnalysisResult
from tests.dicom_validate import dciodvfy_errors, pixelmed_sr_errors
from tests.test_segmentation import SPACING, SPHERES, sphere_volume

HALF = 5  # voxels of the model's 2 mm grid either side of the peak: a 22 mm box


class TwoBrightest(nn.Module):
    """(1, 1, X, Y, Z) -> (1, 3, 8): boxes about the two brightest spots, and one padding row."""

    def __init__(self) -> None:
        super().__init__()
        self.half = HALF

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.half
        v = x[0, 0].clone()
        sy, sz = v.shape[1], v.shape[2]
        rows = []
        for k in range(2):
            flat = int(torch.argmax(v))
            i, j, m = flat // (sy * sz), (flat // sz) % sy, flat % sz
            peak = v[i, j, m]
            lo = torch.tensor([i - half, j - half, m - half], dtype=torch.float32)
            box = torch.cat([lo, lo + 2 * half + 1, torch.stack([20.0 * (peak - 0.5) - k,
                             torch.tensor(0.0)])])  # fmt: skip
            rows.append(box)
            v[max(i - 2 * half, 0):i + 2 * half + 1, max(j - 2 * half, 0):j + 2 * half + 1,
              max(m - 2 * half, 0):m + 2 * half + 1] = 0.0  # fmt: skip
        rows.append(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, -1.0]))  # padding
        return torch.stack(rows)[None]


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    torch.jit.script(TwoBrightest()).save(str(root / "model.ts"))
    ModelManifest.model_validate({
        "name": "brightest-3d", "version": "1.0.0", "kind": "detection", "max_findings": 3,
        "intended_use": "Test network: boxes the brightest spots. Not for clinical use.",
        "input": {"dims": "3d", "spacing": [2.0, 2.0], "slice_spacing": 2.0,
                  "orientation": "RAS", "layout": "columns_rows", "contrast": "window",
                  "window": [-250.0, 1500.0], "denoise": "none"},
        "threshold": 0.5,
        "labels": [{"name": "lesion",
                    "finding": {"value": "52988006", "scheme": "SCT", "meaning": "Lesion"},
                    "site": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}],
        "weights": {"file": "model.ts", "format": "torchscript", "outputs": ["detections"],
                    "sha256": hashlib.sha256((root / "model.ts").read_bytes()).hexdigest()},
    }).write(root / "manifest.toml")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def detected(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedSeries, AnalysisResult]:
    root = tmp_path_factory.mktemp("det3d")
    hu, _ = sphere_volume((72, 160, 160))
    series = load_series(write_ct_series(hu, root / "ct", spacing=SPACING))
    return series, analyse_series(series, load_model(_folder(root / "model"), "cpu"))


def _centre_mm(series: LoadedSeries, sphere: tuple[float, float, float, float]) -> np.ndarray:
    cz, cy, cx, _ = sphere
    return np.asarray(series.image.TransformContinuousIndexToPhysicalPoint(
        (cx / SPACING[2], cy / SPACING[1], cz / SPACING[0])))


def test_each_box_is_a_lesion_on_its_nearest_image_and_in_patient_mm(
    detected: tuple[LoadedSeries, AnalysisResult]
) -> None:
    series, result = detected
    first, second = result.findings
    assert (first.lesion, second.lesion) == (1, 2) and first.probability > second.probability
    for finding in (first, second):
        assert finding.location is not None and finding.region_3d is not None
        section = np.asarray(finding.region_3d)
        # One of the spheres inside the box, its centre within the box's half width.
        centre = min((_centre_mm(series, s) for s in SPHERES),
                     key=lambda c: float(np.linalg.norm(c[:2] - section[:4, :2].mean(axis=0))))
        assert np.linalg.norm(centre[:2] - section[:4, :2].mean(axis=0)) <= (HALF + 1) * 2.0
        # The section lies in the key image's plane, a closed rectangle.
        k = series.sop_instance_uids.index(finding.location.sop_instance_uid)
        plane = series.image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        assert np.allclose(section[:, 2], plane) and np.allclose(section[0], section[-1])
        assert abs(plane - centre[2]) <= (HALF + 1) * 2.0
        assert finding.diameter_mm == pytest.approx((2 * HALF + 1) * 2.0)


def test_the_sr_carries_each_box_as_a_scoord3d_and_validates(
    detected: tuple[LoadedSeries, AnalysisResult], tmp_path: Path
) -> None:
    series, result = detected
    sr = build_ai_result_sr(result, series.headers, series_number=9901,
                            series_instance_uid=generate_uid(), sop_instance_uid=generate_uid())
    sr.save_as(tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    assert pixelmed_sr_errors(tmp_path / "sr.dcm") == []
    regions = [item for item in _walk(sr) if item.get("ValueType") == "SCOORD3D"]
    # Each group's region, and each NUM's INFERRED FROM copy of it.
    assert len(regions) == 2 * (1 + 2)
    assert {r.ReferencedFrameOfReferenceUID for r in regions} == {
        series.headers[0].FrameOfReferenceUID}
    first = np.asarray(regions[0].GraphicData, dtype=float).reshape(-1, 3)
    assert np.allclose(first, np.asarray(result.findings[0].region_3d), atol=1e-3)

    found = read_findings(sr)
    decisions = [(str(f["tracking_uid"]), i == 0, None) for i, f in enumerate(found)]
    verified = build_verified_sr(sr, decisions, verifying_observer_name="Reader^Rita",
                                 verifying_organization="Test hospital", series_number=9903,
                                 series_instance_uid=generate_uid(),
                                 sop_instance_uid=generate_uid())  # fmt: skip
    verified.save_as(tmp_path / "verified.dcm")
    assert dciodvfy_errors(tmp_path / "verified.dcm") == []
    assert pixelmed_sr_errors(tmp_path / "verified.dcm") == []
    # The rejected lesion's box is gone: only the confirmed one's region is left.
    assert len([i for i in _walk(verified) if i.get("ValueType") == "SCOORD3D"]) == 3


def _walk(item):  # type: ignore[no-untyped-def]
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)
