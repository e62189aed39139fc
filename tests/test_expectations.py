"""The out-of-distribution gate: outside what a model was made for, the AI does not run.

The built-in models record, in `[expects]`, the plane, field of view,
intensity percentiles and noise of the studies their generator makes
(`secondreader model expectations`). A sagittal reformat, a small field of
view, a real CT with a padded border or the real radiograph of pydicom-data
get the "AI not run, because..." result with the reason, never a
probability; a phantom like those it was trained on is analysed.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from dicom_io.series import load_series
from dicom_io.sr.not_run import build_not_run_sr
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_study
from model.expectations import FLOOR, MARGIN, check, record
from model.manifest import Expectations, Range
from model.phantom import phantom_volume
from model.registry import LoadedModel, builtin_model_dir, load_model
from model.results import Outcome

SPACING = (2.5, 1.4, 1.4)  # a 256 matrix: a 358 mm field of view, as the generator's


def _row(**values: object) -> dict[str, object]:
    return {"plane": "axial", "field_of_view": 360.0, "p01": -1024.0, "p50": -950.0,
            "p99": 700.0, "noise": 20.0} | values  # fmt: skip


def test_recorded_ranges_are_the_training_span_widened() -> None:
    rows = [_row(field_of_view=330.0 + 10 * i, p50=-1000.0 + 20 * i) for i in range(10)]
    expects = record(rows, "10 made-up studies")
    assert expects.planes == ["axial"]
    assert expects.field_of_view == Range(low=330.0 - MARGIN * 90, high=420.0 + MARGIN * 90)
    # Every study had p01 = -1024: the range is not of width 0, but FLOOR of the
    # intensity scale (p99 max - p01 min) wide on each side.
    pad = FLOOR * (700.0 + 1024.0)
    assert expects.p01 == Range(low=round(-1024.0 - pad, 3), high=round(-1024.0 + pad, 3))
    with pytest.raises(ValueError, match="too few"):
        record(rows[:9], "nine")


def test_check_names_every_value_outside_and_its_range() -> None:
    expects = record([_row(noise=10.0 + i) for i in range(10)], "10 made-up studies")
    assert check(expects, _row(noise=15.0), "demo") is None
    assert check(None, _row(p50=5000.0), "demo") is None  # no [expects]: not gated
    reason = check(expects, _row(field_of_view=150.0, noise=90.0), "demo", " HU")
    assert reason is not None
    assert reason.startswith("the series is outside what demo was made for: ")
    assert "field of view 150 mm (expected " in reason and "noise 90 HU (expected " in reason
    assert reason.endswith("(ranges recorded from 10 made-up studies)")
    sagittal = check(expects, _row(plane="sagittal", noise=15.0), "demo")
    assert sagittal is not None and "the images are sagittal" in sagittal
    assert "no noise to compare" in (check(expects, _row(noise=None), "demo") or "")


def test_ranges_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="above high"):
        Expectations(p50=Range(low=1.0, high=0.0))


@pytest.fixture(scope="module")
def ct_model() -> LoadedModel:
    model = load_model(builtin_model_dir("ct-nodule"), "cpu")
    assert model.manifest.expects is not None, "the built-in CT model records [expects]"
    return model


def _phantom(folder: Path, rows: int = 256, spacing: tuple[float, float, float] = SPACING,
             **geometry: object) -> list[Path]:  # fmt: skip
    volume, _ = phantom_volume(4, n_slices=20, rows=rows, cols=rows, spacing=spacing, lesion=True)
    return write_ct_series(volume, folder, spacing=spacing, **geometry)  # type: ignore[arg-type]


def _real_ct(folder: Path) -> list[Path]:
    """pydicom-data's one real CT slice, five times: the model needs five images."""
    real = load_series([Path(str(get_testdata_file("693_UNCI.dcm")))])
    hu = sitk.GetArrayFromImage(real.image)
    sx, sy = real.image.GetSpacing()[:2]
    return write_ct_series(np.repeat(hu, 5, axis=0), folder, spacing=(5.0, sy, sx))


def test_a_series_like_the_training_data_is_analysed(ct_model: LoadedModel, tmp_path: Path) -> None:
    [result] = analyse_study([load_series(_phantom(tmp_path))], [ct_model])
    assert result.outcome == Outcome.ANALYSED and result.findings


@pytest.mark.parametrize(
    ("make", "says"),
    [
        # A sagittal reformat of the same chest: the model only saw axial slices.
        (lambda d: _phantom(d, row_direction=(0.0, 1.0, 0.0), column_direction=(0.0, 0.0, -1.0)),
         "the images are sagittal"),
        # A 90 mm field of view: each structure four times the size it was trained on.
        (lambda d: _phantom(d, rows=128, spacing=(2.5, 0.7, 0.7)), "field of view 89.6 mm"),
        # pydicom-data's real CT: a 245 mm field of view, a smooth, quiet reconstruction.
        (lambda d: _real_ct(d), "field of view 245 mm"),
    ],
    ids=["sagittal", "small-field-of-view", "real-ct"],
)
def test_a_series_outside_gets_the_reason_not_a_probability(
    ct_model: LoadedModel, tmp_path: Path, make: Callable[[Path], list[Path]], says: str
) -> None:
    series = load_series(make(tmp_path / "series"))
    [result] = analyse_study([series], [ct_model])
    assert result.outcome == Outcome.FAILED_QC and result.findings == []
    assert result.reason is not None and says in result.reason
    assert "secondreader-demo-nodule-ct was made for" in result.reason
    # What the PACS gets: the "AI analysis not performed" SR with the reason.
    sr = build_not_run_sr(series.headers[:1], result.reason, result.algorithm,
                          outcome=result.outcome, series_number=990)  # fmt: skip
    texts = [item.TextValue for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert f"Reason: {result.reason}" in texts


def test_the_real_radiograph_is_not_called_positive(tmp_path: Path) -> None:
    # The demo CR model called it "99.97 % present" before it knew its limits.
    cr_model = load_model(builtin_model_dir("cr-nodule"), "cpu")
    series = load_series([Path(str(get_testdata_file("RG1_UNCI.dcm")))])
    [result] = analyse_study([series], [cr_model])
    assert result.outcome == Outcome.FAILED_QC and result.findings == []
    assert result.reason is not None and "99th intensity percentile" in result.reason


def test_the_command_records_a_model_folders_expectations(tmp_path: Path) -> None:
    folder = tmp_path / "cr"
    subprocess.run(["cp", "-r", str(builtin_model_dir("cr-nodule")), str(folder)], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "model", "expectations", str(folder),
         "--studies", "20", "--seed", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expects = load_model(folder, "cpu").manifest.expects
    assert expects is not None and expects.planes == []  # radiographs have no plane
    assert expects.recorded_from == "20 studies of the synthetic training generator, seed 3"
    assert expects.p99 is not None and f"{expects.p99.low:g} to {expects.p99.high:g}" in done.stdout
