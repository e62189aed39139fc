"""The demonstration 3D segmentation bundle through secondreader: imported, matched, exported.

`secondreader model import-bundle` makes a model folder of the MONAI bundle
(model/bundles/ct-nodule-seg) without executing its config. secondreader's
own steps (SimpleITK orientation and spacing, MONAI's sliding-window
inference, the label map back on the source images) must give what MONAI's
own pipeline gives (bench/monai_reference.py) on a demo CT, and find the
phantom's nodule. Exported to ONNX, the model gives the same findings and
the same SR content as on torch.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from bench.monai_reference import monai_label_map_on_source
from dicom_io.seg import build_segmentation_seg
from dicom_io.series import LoadedSeries, load_series
from dicom_io.sr import build_ai_result_sr, read_findings
from model.analysis import analyse_series
from model.export import export_onnx
from model.phantom import phantom_nodule_mask
from model.registry import load_model
from model.results import AnalysisResult
from tests.test_review_orthanc import demo_ct

BUNDLE = Path(__file__).resolve().parents[1] / "model" / "bundles" / "ct-nodule-seg"
SEED = 3  # the demo CT with a nodule that the viewer tests open

pytestmark = pytest.mark.timeout(600)


def import_bundle(into: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "model", "import-bundle", str(BUNDLE),
         "--manifest", str(BUNDLE / "codes.toml"), "--into", str(into)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("models") / "ct-nodule-seg"
    done = import_bundle(into)
    assert done.returncode == 0, done.stderr
    assert "SlidingWindowInferer roi [64, 64, 64], overlap 0.25, gaussian" in done.stdout
    return into


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedSeries]:
    folder = tmp_path_factory.mktemp("ct")
    return folder, load_series(demo_ct(folder, seed=SEED))


@pytest.fixture(scope="module")
def result(imported: Path, ct: tuple[Path, LoadedSeries]) -> AnalysisResult:
    return analyse_series(ct[1], load_model(imported, "cpu"))


def _labels(result: AnalysisResult, series: LoadedSeries) -> np.ndarray:
    """The result's regions on the whole source grid (z, y, x)."""
    cols, rows, n = series.image.GetSize()
    out = np.zeros((n, rows, cols), dtype=np.uint16)
    assert result.label_map is not None
    index = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    for uid, frame in zip(result.label_map.source_sop_instance_uids, result.label_map.frames,
                          strict=True):  # fmt: skip
        out[index[uid]] = frame
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_the_bundle_imports_as_a_3d_segmentation_model(imported: Path) -> None:
    m = load_model(imported, "cpu").manifest
    assert (m.kind, m.input.dims, m.input.orientation, m.input.layout) == (
        "segmentation", "3d", "RAS", "columns_rows")
    assert (m.input.spacing, m.input.slice_spacing, m.input.window) == ((2.0, 2.0), 2.0,
                                                                       (-250.0, 1500.0))
    assert m.inference.roi_size == (64, 64, 64) and m.inference.blend == "gaussian"
    assert "NOT FOR CLINICAL USE" in m.intended_use
    # The bundle's held-out figures travel with it, for the AI committee.
    assert m.metrics["shifted.lesion_sensitivity.denominator"] == 20.0


def test_secondreader_finds_what_monais_own_pipeline_finds(
    result: AnalysisResult, ct: tuple[Path, LoadedSeries]
) -> None:
    folder, series = ct
    ours = _labels(result, series) > 0
    theirs = monai_label_map_on_source(folder, BUNDLE) > 0
    # SimpleITK's linear resampling against torch's: a few voxels on the edge.
    assert _dice(ours, theirs) >= 0.98
    assert abs(int(ours.sum()) - int(theirs.sum())) <= 0.03 * theirs.sum()
    truth = phantom_nodule_mask(SEED, n_slices=series.n_slices, rows=256, cols=256,
                                spacing=(2.5, 1.4, 1.4))  # fmt: skip
    assert _dice(ours, truth) > 0.6
    (lesion,) = [f for f in result.findings if f.present]
    assert lesion.lesion == 1 and lesion.volume_ml is not None
    true_ml = float(truth.sum()) * 2.5 * 1.4 * 1.4 / 1000
    assert lesion.volume_ml == pytest.approx(true_ml, rel=0.3)


def test_the_onnx_export_gives_the_same_findings_and_sr_content(
    imported: Path, result: AnalysisResult, ct: tuple[Path, LoadedSeries], tmp_path: Path
) -> None:
    exported = export_onnx(imported, tmp_path / "onnx")
    onnx = load_model(exported, "cpu")
    assert onnx.runtime.name == "onnxruntime"
    again = analyse_series(ct[1], onnx)
    assert len(again.findings) == len(result.findings)
    for a, b in zip(again.findings, result.findings, strict=True):
        assert abs(a.probability - b.probability) <= 1e-4
        assert (a.volume_ml, a.diameter_mm, a.mean_intensity, a.max_intensity, a.location) == (
            b.volume_ml, b.diameter_mm, b.mean_intensity, b.max_intensity, b.location)
    assert np.array_equal(_labels(again, ct[1]), _labels(result, ct[1]))

    def content(r: AnalysisResult) -> list[dict[str, object]]:
        assert r.label_map is not None and r.algorithm is not None
        seg = build_segmentation_seg(r.label_map, ct[1].headers, r.algorithm, r.findings,
                                     series_number=9908, series_instance_uid=generate_uid(),
                                     sop_instance_uid=generate_uid())  # fmt: skip
        sr = build_ai_result_sr(r, ct[1].headers, regions=seg, series_number=9901,
                                series_instance_uid=generate_uid(),
                                sop_instance_uid=generate_uid())  # fmt: skip
        # The weights differ (their hash names the device and so the tracking
        # UIDs); the probabilities within 1e-4 (above); nothing else may.
        drop = {"tracking_uid", "segmentation_sop_instance_uid", "probability"}
        return [{k: v for k, v in f.items() if k not in drop} for f in read_findings(sr)]

    assert content(again) == content(result)


def test_check_and_evaluate_speak_of_a_segmentation_model(imported: Path) -> None:
    """What an administrator runs before adding the folder: no traceback, the kind, the figures."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "model", *args],
                              capture_output=True, text=True, timeout=300)  # fmt: skip

    check = cli("check", str(imported))
    assert check.returncode == 0, check.stderr
    # A batch of windows in, two channels (background, nodule) out.
    assert re.search(r"segmentation\s+4 x 2 x 64 x 64 x 64", check.stdout), check.stdout
    assert "time per window" in check.stdout and "per voxel, the softmax" in check.stdout
    evaluated = cli("evaluate", str(imported))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "a segmentation model" in evaluated.stdout
    assert "shifted.lesion_sensitivity.low" in evaluated.stdout
