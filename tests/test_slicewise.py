"""Slice by slice, each image alone: the network input `preprocess` makes of the whole series.

Streaming prepares each image as it arrives (model/stream.py), so the
slice-wise path must give the very numbers of the whole-series path, whatever
the series' orientation and however its slices are grouped; and the memo of
images read ahead must never hand out the pixels of a file that has changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_io.series import load_series, read_image_file
from dicom_io.synthetic import write_ct_series
from model.manifest import ModelManifest
from model.phantom import phantom_volume
from model.preprocess import preprocess
from model.registry import builtin_model_dirs, load_model
from model.slicewise import prepare_slices, series_plan, source_order
from model.stream import ReadAhead

CT_MANIFEST = next(d for d in builtin_model_dirs() if d.name == "ct-nodule") / "manifest.toml"


def ct(folder: Path, **geometry: object) -> list[Path]:
    volume, _ = phantom_volume(2, n_slices=12, rows=96, cols=80, lesion=True,
                               spacing=(2.0, 1.6, 1.8))  # fmt: skip
    return write_ct_series(volume, folder, spacing=(2.0, 1.6, 1.8), **geometry)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "geometry",
    [
        {},  # axial, head first: the usual
        {"slice_direction": (0.0, 0.0, -1.0)},  # slices stacked the other way
        {"row_direction": (-1.0, 0.0, 0.0), "column_direction": (0.0, -1.0, 0.0)},  # rotated
        {"row_direction": (0.0, 1.0, 0.0), "column_direction": (1.0, 0.0, 0.0)},  # transposed
    ],
    ids=["axial", "reversed", "rotated", "transposed"],
)
def test_slice_by_slice_gives_the_whole_series_numbers_bit_for_bit(
    tmp_path: Path, geometry: dict
) -> None:
    spec = ModelManifest.from_file(CT_MANIFEST).input
    series = load_series(ct(tmp_path / "ct", **geometry))
    whole = preprocess(series, spec).array
    plan = series_plan(series, spec)
    assert plan is not None
    values = sitk.GetArrayViewFromImage(series.image)
    order = source_order(plan, series.n_slices)
    alone = np.concatenate([prepare_slices(values[[k]], plan, spec) for k in order])
    assert np.array_equal(alone, whole)
    in_threes = np.concatenate(
        [prepare_slices(values[order[i : i + 3]], plan, spec) for i in range(0, len(order), 3)]
    )
    assert np.array_equal(in_threes, whole)


@pytest.mark.parametrize("nonzero", [False, True], ids=["zscore", "zscore-nonzero"])
def test_zscore_slice_by_slice_is_the_whole_series_bit_for_bit(
    tmp_path: Path, nonzero: bool
) -> None:
    # MONAI's NormalizeIntensity on a 2D bundle's slice: a per-slice statistic, so
    # each slice alone gives the whole series' numbers. A rotated series, fixed
    # spacing (the pad fills some pixels) and no denoising: the bundles' case.
    spec = ModelManifest.from_file(CT_MANIFEST).input.model_copy(update={
        "contrast": "zscore", "zscore_nonzero": nonzero, "denoise": "none",
        "spacing": (1.9, 1.7), "size": (96, 64), "window": None})
    series = load_series(ct(tmp_path / "ct", row_direction=(-1.0, 0.0, 0.0),
                            column_direction=(0.0, -1.0, 0.0)))
    whole = preprocess(series, spec).array
    plan = series_plan(series, spec)
    assert plan is not None and plan.flip_x
    values = sitk.GetArrayViewFromImage(series.image)
    order = source_order(plan, series.n_slices)
    alone = np.concatenate([prepare_slices(values[[k]], plan, spec) for k in order])
    assert np.array_equal(alone, whole)
    # Each slice: mean 0, deviation 1 (over its nonzero pixels with `nonzero`).
    for plane in whole:
        used = plane[plane != 0] if nonzero else plane
        assert abs(float(used.mean())) < 1e-4 and abs(float(used.std()) - 1.0) < 1e-4


def test_a_file_read_ahead_is_used_only_while_it_is_the_same_file(tmp_path: Path) -> None:
    model = load_model(CT_MANIFEST.parent, "cpu")
    files = ct(tmp_path / "ct")
    spool = tmp_path / "spool"
    spool.mkdir()
    paths = [Path(shutil.copy(f, spool / f.name)) for f in files]
    (spool / "broken.dcm").write_bytes(b"DICM but not really")
    ahead = ReadAhead([model], max_bytes=2**30)

    # An unreadable file is left for the analysis at completion to report.
    assert ahead.add("1.2.3", [*paths[:4], spool / "broken.dcm"]) == 4
    assert ahead.add("1.2.3", paths[:4]) == 0  # read once
    taken = ahead.take(paths)
    assert set(taken.images) == set(paths[:4])
    loaded = load_series(paths, taken.images)
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded.image),
                          sitk.GetArrayViewFromImage(load_series(paths).image))  # fmt: skip

    # The same instance re-sent with other pixels replaces the file: not the memo's any more.
    other = read_image_file(paths[0]).header
    shutil.copy(files[5], paths[0])
    assert paths[0] not in ahead.take(paths).images
    assert ahead.add("1.2.3", paths[:1]) == 1  # read again, as it is now
    assert ahead.take(paths).images[paths[0]].header.SOPInstanceUID != other.SOPInstanceUID


def test_read_ahead_memory_is_bounded_and_a_closed_study_is_not_read(tmp_path: Path) -> None:
    model = load_model(CT_MANIFEST.parent, "cpu")
    files = ct(tmp_path / "ct")
    one = read_image_file(files[0]).nbytes
    ahead = ReadAhead([model], max_bytes=3 * one)
    ahead.add("1.2.3", files)
    # Past the bound nothing more is held: the rest is read at completion.
    assert 0 < len(ahead.take(files).images) <= 4
    ahead.drop_study("1.2.3")
    assert ahead.nbytes == 0 and not ahead.take(files).images
    ahead.close("1.2.3")  # its analysis has begun
    assert ahead.add("1.2.3", files) == 0
