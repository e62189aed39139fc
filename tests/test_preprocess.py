"""Preprocessing: the training transform's arithmetic, orientation, provenance, mapping back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from dicom_io.series import LoadedSeries, load_series
from dicom_io.synthetic import write_ct_series
from model.datasets import network_input_stack
from model.manifest import InputSpec
from model.preprocess import (
    preprocess,
    source_slices_covering,
    to_source_grid,
)

SPACING = (2.0, 0.7, 0.8)  # slice, row, column mm


def phantom(shape: tuple[int, int, int] = (6, 48, 40), seed: int = 2) -> np.ndarray:
    """Noisy HU with a bright block: texture for the filters, a landmark for the geometry.

    Clipped at -1024 HU, the lowest value the CT writer can store.
    """
    rng = np.random.default_rng(seed)
    vol = rng.normal(-600.0, 250.0, size=shape).round().clip(-1024.0, None).astype(np.float32)
    vol[2:4, 10:16, 25:31] = 900.0
    return vol


def write_both(vol: np.ndarray, root: Path) -> tuple[LoadedSeries, LoadedSeries]:
    """The same anatomy written twice: standard axial, and with rows and slices reversed."""
    nz, _, nx = vol.shape
    standard = write_ct_series(vol, root / "std", spacing=SPACING, origin=(-20.0, -30.0, 50.0))
    # Voxel (k, j, i) of the flipped series is voxel (nz-1-k, j, nx-1-i) of the
    # standard one; its first voxel sits where the standard series' last slice
    # and last column meet.
    flipped_origin = (-20.0 + (nx - 1) * SPACING[2], -30.0, 50.0 + (nz - 1) * SPACING[0])
    flipped = write_ct_series(
        vol[::-1, :, ::-1].copy(),
        root / "flip",
        spacing=SPACING,
        origin=flipped_origin,
        row_direction=(-1.0, 0.0, 0.0),
        slice_direction=(0.0, 0.0, -1.0),
    )
    return load_series(standard), load_series(flipped)


SPECS = [
    InputSpec(),
    InputSpec(denoise="curvature_flow", contrast="histogram"),
    InputSpec(denoise="none", contrast="histogram", spacing=(1.5, 1.5)),
    InputSpec(size=(64, 96), denoise_sigma_mm=2.0),
]


@pytest.mark.parametrize("spec", SPECS, ids=["default", "curvature-hist", "fixed-pad", "64x96"])
def test_matches_the_training_transform(tmp_path: Path, spec: InputSpec) -> None:
    vol = phantom()
    series = load_series(write_ct_series(vol, tmp_path, spacing=SPACING))
    pre = preprocess(series, spec)
    expected = network_input_stack(vol, SPACING[1:], spec)
    assert pre.array.dtype == np.float32
    assert pre.array.shape == expected.shape == (vol.shape[0], *spec.size)
    np.testing.assert_allclose(pre.array, expected, atol=1e-5)


def test_builtin_window_gives_the_unit_range(tmp_path: Path) -> None:
    # Window -400 / 1500 spans -1150 .. 350 HU.
    vol = np.full((3, 32, 32), -400.0, dtype=np.float32)  # centre: 0.5
    vol[:, :, 16:] = -1024.0  # air: (1150 - 1024) / 1500
    vol[:, 8:12, 4:8] = 900.0  # above the top: clipped to 1
    series = load_series(write_ct_series(vol, tmp_path, spacing=SPACING))
    pre = preprocess(series, InputSpec(size=(32, 32), denoise="none"))
    assert pre.array.min() >= 0.0 and pre.array.max() == 1.0
    assert pre.array[:, 20, 8] == pytest.approx([0.5] * 3)
    assert pre.array[:, 20, 24] == pytest.approx([126.0 / 1500.0] * 3)
    assert pre.array[:, 10, 5] == pytest.approx([1.0] * 3)


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_two_orientations_give_the_same_network_input(tmp_path: Path, orientation: str) -> None:
    standard, flipped = write_both(phantom(), tmp_path)
    spec = InputSpec(orientation=orientation)
    a = preprocess(standard, spec)
    b = preprocess(flipped, spec)
    np.testing.assert_allclose(a.array, b.array, atol=1e-5)
    assert a.image.GetDirection() == pytest.approx(b.image.GetDirection())
    assert a.image.GetOrigin() == pytest.approx(b.image.GetOrigin())
    assert a.steps[0]["parameters"]["target"] == orientation  # type: ignore[index]


@pytest.mark.parametrize(
    "direction",
    [
        (-1, 0, 0, 0, 1, 0, 0, 0, -1),  # axial, rows and slices reversed
        (1, 0, 0, 0, 0, -1, 0, 1, 0),  # coronal
        (0, 0, -1, 1, 0, 0, 0, -1, 0),  # sagittal
        (0.866025, -0.5, 0, 0.5, 0.866025, 0, 0, 0, 1),  # oblique, 30 degrees
    ],
    ids=["axial-flipped", "coronal", "sagittal", "oblique"],
)
def test_orientation_is_dicomorient(direction: tuple[float, ...]) -> None:
    """Reorienting through the resampling grid gives what sitk.DICOMOrient gives."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=(5, 7, 9)).astype(np.float32))
    image.SetSpacing((0.6, 0.9, 2.5))
    image.SetOrigin((3.0, -4.0, 12.0))
    image.SetDirection(direction)
    oriented = sitk.DICOMOrient(image, "LPS")
    cols, rows, _ = oriented.GetSize()
    series = LoadedSeries(
        image,
        [f"1.2.{k}" for k in range(5)],
        None,
        "1.2.840",
        "CT",
        None,
        None,
        "1.2.3",
        "1.2.4",
        False,
        [],
    )
    # Network size = oriented size and spacing fitted to it: the resample is exact.
    pre = preprocess(series, InputSpec(size=(rows, cols), denoise="none", contrast="none"))
    np.testing.assert_allclose(pre.array, sitk.GetArrayFromImage(oriented), atol=1e-5)
    assert pre.image.GetOrigin() == pytest.approx(oriented.GetOrigin(), abs=1e-4)
    assert pre.image.GetDirection() == pytest.approx(oriented.GetDirection(), abs=1e-6)
    assert pre.image.GetSpacing() == pytest.approx(oriented.GetSpacing())


def test_steps_are_recorded_with_parameters_and_time(tmp_path: Path) -> None:
    series = load_series(write_ct_series(phantom(), tmp_path, spacing=SPACING))
    pre = preprocess(series, InputSpec(denoise="gaussian", denoise_sigma_mm=1.2))
    assert [s["name"] for s in pre.steps] == ["orientation", "resample", "denoise", "contrast"]
    assert all(isinstance(s["seconds"], float) and s["seconds"] >= 0.0 for s in pre.steps)
    params = {s["name"]: s["parameters"] for s in pre.steps}
    assert params["resample"]["size"] == [128, 128, 6]  # type: ignore[index]
    assert params["resample"]["spacing_mm"] == [  # type: ignore[index]
        pytest.approx(48 * 0.7 / 128),
        pytest.approx(40 * 0.8 / 128),
        2.0,
    ]
    assert params["denoise"] == {"method": "gaussian", "sigma_mm": 1.2, "dimensions": "in-plane"}
    assert params["contrast"] == {"method": "window", "center": -400.0, "width": 1500.0}


def test_padding_takes_each_slice_minimum(tmp_path: Path) -> None:
    vol = phantom()
    vol[4] = np.maximum(vol[4], -500.0)  # a slice with another minimum
    series = load_series(write_ct_series(vol, tmp_path, spacing=SPACING))
    # 2 mm pixels over 128: 256 mm, far wider than the 34 x 32 mm image.
    pre = preprocess(series, InputSpec(spacing=(2.0, 2.0), denoise="none", contrast="none"))
    assert pre.steps[1]["parameters"]["padded"] is True  # type: ignore[index]
    np.testing.assert_array_equal(pre.array[:, 0, 0], vol.min(axis=(1, 2)))


def test_slice_spacing_resamples_through_plane(tmp_path: Path) -> None:
    series = load_series(write_ct_series(phantom((10, 16, 16)), tmp_path, spacing=SPACING))
    pre = preprocess(series, InputSpec(size=(16, 16), slice_spacing=4.0, denoise="none"))
    assert pre.array.shape == (5, 16, 16)
    assert pre.image.GetSpacing()[2] == 4.0
    # Same centre: 10 slices at 2 mm and 5 at 4 mm both span 20 mm about one midpoint.
    mid_in = series.image.TransformContinuousIndexToPhysicalPoint((7.5, 7.5, 4.5))
    mid_out = pre.image.TransformContinuousIndexToPhysicalPoint((7.5, 7.5, 2.0))
    assert mid_out == pytest.approx(mid_in)


def test_projection_keeps_its_axes_and_gets_histogram_contrast() -> None:
    series = load_series([get_testdata_file("RG1_UNCI.dcm")])
    lps = preprocess(series, InputSpec(orientation="LPS", contrast="histogram"))
    ras = preprocess(series, InputSpec(orientation="RAS", contrast="histogram"))
    assert lps.steps[0]["parameters"]["applied"] is False  # type: ignore[index]
    np.testing.assert_array_equal(lps.array, ras.array)  # no flip of a chest X-ray
    assert lps.array.shape == (1, 128, 128)
    assert lps.array.min() == 0.0 and lps.array.max() == 1.0
    low, high = np.percentile(lps.array, [1.0, 99.0])
    assert low == pytest.approx(0.0, abs=1e-3) and high == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("which", ["standard", "flipped"])
def test_to_source_grid_maps_a_point_back(tmp_path: Path, which: str) -> None:
    vol = phantom()
    nz, _, nx = vol.shape
    standard, flipped = write_both(vol, tmp_path)
    series = standard if which == "standard" else flipped
    pre = preprocess(series, InputSpec(denoise="none", contrast="none"))
    # A spike on the network grid, in the bright block (source slice 2, row 12, col 27).
    point = standard.image.TransformIndexToPhysicalPoint((27, 12, 2))
    c, r, k = (int(round(v)) for v in pre.image.TransformPhysicalPointToContinuousIndex(point))
    spike = np.zeros_like(pre.array)
    spike[k, r, c] = 1.0
    back = to_source_grid(spike, pre, series)
    assert back.shape == vol.shape
    found = np.unravel_index(int(np.argmax(back)), back.shape)
    expected = (2, 12, 27) if which == "standard" else (nz - 1 - 2, 12, nx - 1 - 27)
    # Network pixels are ~0.26 mm wide against 0.7-0.8 mm source pixels: within one pixel.
    assert found[0] == expected[0]
    assert abs(found[1] - expected[1]) <= 1 and abs(found[2] - expected[2]) <= 1
    assert back.dtype == np.float32


def test_to_source_grid_undoes_the_resampling(tmp_path: Path) -> None:
    # Linear interpolation reproduces a linear ramp exactly, there and back.
    z, y, x = np.mgrid[0:6, 0:48, 0:40].astype(np.float32)
    vol = np.round(-500.0 + 8.0 * x + 5.0 * y + 20.0 * z)
    _, flipped = write_both(vol, tmp_path)
    pre = preprocess(flipped, InputSpec(denoise="none", contrast="none"))
    back = to_source_grid(pre.array, pre, flipped)
    source = sitk.GetArrayFromImage(flipped.image)
    # The border pixels see the clamped edge of the network grid; inside is exact.
    np.testing.assert_allclose(back[:, 1:-1, 1:-1], source[:, 1:-1, 1:-1], atol=1e-2)


def test_to_source_grid_on_a_slab_equals_the_full_map(tmp_path: Path) -> None:
    series = load_series(write_ct_series(phantom((10, 24, 20)), tmp_path, spacing=SPACING))
    pre = preprocess(series, InputSpec(size=(32, 32), denoise="none"))
    sparse = np.zeros_like(pre.array)
    sparse[6] = pre.array[6]
    first, stop = source_slices_covering(pre, series, [6])
    assert (first, stop) == (5, 8)  # slice 6 and the two it interpolates with
    full = to_source_grid(sparse, pre, series)
    part = to_source_grid(sparse, pre, series, slices=(first, stop))
    np.testing.assert_allclose(part, full[first:stop], atol=1e-6)
    assert not full[:first].any() and not full[stop:].any()
