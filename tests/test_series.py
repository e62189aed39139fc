"""Loading series: slice order, per-slice rescale, geometry, QC refusals, real sample files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_io.series import LoadedSeries, SeriesQCError, choose_series, load_series
from dicom_io.synthetic import write_ct_series


def volume(shape: tuple[int, int, int] = (8, 24, 20), seed: int = 1) -> np.ndarray:
    """Integer HU, each slice different, so a wrong slice order cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    vol += np.arange(shape[0], dtype=np.float32)[:, None, None] * 7
    return vol


def sitk_array(series: LoadedSeries) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(series.image)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def write_enhanced_ct(
    volume_hu: np.ndarray,
    path: Path,
    *,
    spacing: tuple[float, float, float] = (2.0, 0.7, 0.8),
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    slopes: list[float] | None = None,
    seed: int = 0,
) -> tuple[Path, np.ndarray]:
    """One Enhanced CT file; frames stored in shuffled order. Returns (path, stored order).

    Frame i (1-based i + 1) holds slice order[i], with its own rescale slope
    in the per-frame Pixel Value Transformation: what a loader must untangle.
    """
    n, rows, cols = volume_hu.shape
    order = np.random.default_rng(seed).permutation(n)
    slopes = slopes or [1.0] * n
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [spacing[1], spacing[2]]
    measures.SliceThickness = spacing[0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    frames = []
    for k in order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        rescale = Dataset()
        rescale.RescaleSlope = slopes[k]
        rescale.RescaleIntercept = -1024
        rescale.RescaleType = "HU"
        item.PlanePositionSequence = Sequence([position])
        item.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(item)
        frames.append(np.round((volume_hu[k] + 1024.0) / slopes[k]).astype(np.uint16))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path, order


# -- Classic single-frame CT ------------------------------------------------------


def test_axial_series_keeps_its_geometry(tmp_path: Path) -> None:
    vol = volume()
    paths = write_ct_series(vol, tmp_path, spacing=(2.0, 0.7, 0.8), origin=(-5.0, -6.0, 40.0))
    series = load_series(paths)
    assert np.array_equal(sitk_array(series), vol)
    assert series.image.GetSpacing() == pytest.approx((0.8, 0.7, 2.0))
    assert series.image.GetOrigin() == pytest.approx((-5.0, -6.0, 40.0))
    assert series.image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert series.sop_instance_uids == [uid_of(p) for p in paths]
    assert series.frame_numbers is None
    assert not series.is_projection
    assert (series.modality, series.body_part) == ("CT", "CHEST")
    assert len(series.headers) == len(paths)
    assert all("PixelData" not in h for h in series.headers)
    assert [h.SOPInstanceUID for h in series.headers] == series.sop_instance_uids
    assert series.warnings == []


def test_shuffled_instance_numbers_are_sorted_by_position(tmp_path: Path) -> None:
    vol = volume()
    paths = write_ct_series(vol, tmp_path, shuffle_instance_numbers=True, seed=3)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers)  # the writer really shuffled them
    series = load_series(list(reversed(paths)))
    assert np.array_equal(sitk_array(series), vol)
    assert series.sop_instance_uids == [uid_of(p) for p in paths]


def test_reversed_slice_direction_sorts_along_the_normal(tmp_path: Path) -> None:
    vol = volume()
    paths = write_ct_series(
        vol,
        tmp_path,
        spacing=(1.5, 0.7, 0.7),
        origin=(0.0, 0.0, 100.0),
        row_direction=(-1.0, 0.0, 0.0),
        slice_direction=(0.0, 0.0, -1.0),
    )
    series = load_series(paths)
    # Normal = row x column = (0, 0, -1): slice k is k * 1.5 mm further towards the feet.
    assert series.image.GetDirection() == pytest.approx((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    assert np.array_equal(sitk_array(series), vol)
    z = [series.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(len(vol))]
    assert z == pytest.approx([100.0 - 1.5 * k for k in range(len(vol))])


def test_rescale_slope_is_applied_per_slice(tmp_path: Path) -> None:
    vol = volume((6, 16, 16))
    vol = np.round(vol / 4) * 4  # exact under every slope below
    slopes = [1.0, 0.5, 2.0, 0.25, 1.0, 4.0]
    paths = write_ct_series(vol, tmp_path, rescale_slopes=slopes)
    series = load_series(paths)
    assert np.array_equal(sitk_array(series), vol)
    assert sitk_array(series).dtype == np.float32


def test_repeated_instance_is_ignored(tmp_path: Path) -> None:
    vol = volume((4, 8, 8))
    paths = write_ct_series(vol, tmp_path / "a")
    copy = tmp_path / "copy.dcm"
    shutil.copy(paths[2], copy)
    series = load_series([*paths, copy])
    assert np.array_equal(sitk_array(series), vol)
    assert any("repeated" in w for w in series.warnings)


def test_files_of_two_series_are_a_caller_error(tmp_path: Path) -> None:
    a = write_ct_series(volume((3, 8, 8)), tmp_path / "a")
    b = write_ct_series(volume((3, 8, 8)), tmp_path / "b")
    with pytest.raises(ValueError, match="2 series"):
        load_series([*a, *b])


# -- QC refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("skip", "expected"),
    [
        (
            (4,),
            "slice gap of 2 mm between slice locations 3 mm and 5 mm where 1 mm is expected: "
            "1 slice missing",
        ),
        (
            (3, 4),
            "slice gap of 3 mm between slice locations 2 mm and 5 mm where 1 mm is expected: "
            "2 slices missing",
        ),
    ],
)
def test_missing_slice_is_refused(tmp_path: Path, skip: tuple[int, ...], expected: str) -> None:
    paths = write_ct_series(
        volume((10, 8, 8)),
        tmp_path,
        spacing=(1.0, 0.7, 0.7),
        origin=(0.0, 0.0, 0.0),
        skip_slices=skip,
    )
    with pytest.raises(SeriesQCError) as err:
        load_series(paths)
    assert err.value.reason == expected


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(
        volume((8, 8, 8)), tmp_path, spacing=(1.0, 0.7, 0.7), origin=(0.0, 0.0, 0.0)
    )
    edit(paths[5], ImagePositionPatient=[0.0, 0.0, 5.5])
    expected = r"uneven slice spacing: 1\.5 mm between slice locations 4 mm and 5\.5 mm"
    with pytest.raises(SeriesQCError, match=expected):
        load_series(paths)


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(volume((6, 8, 8)), tmp_path)
    tilt = np.deg2rad(15.0)
    edit(paths[3], ImageOrientationPatient=[1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))])
    with pytest.raises(SeriesQCError, match="mixes image orientations"):
        load_series(paths)


def test_two_images_at_one_position_are_refused(tmp_path: Path) -> None:
    paths = write_ct_series(volume((5, 8, 8)), tmp_path, origin=(0.0, 0.0, 0.0))
    twin = tmp_path / "twin.dcm"
    shutil.copy(paths[2], twin)
    edit(twin, SOPInstanceUID=generate_uid())
    with pytest.raises(SeriesQCError, match="same slice location 2 mm"):
        load_series([*paths, twin])


def test_mixed_image_sizes_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    a = write_ct_series(volume((4, 16, 16)), tmp_path / "a", series_uid=uid, origin=(0.0, 0.0, 0.0))
    b = write_ct_series(volume((1, 8, 8)), tmp_path / "b", series_uid=uid, origin=(0.0, 0.0, 4.0))
    with pytest.raises(SeriesQCError, match="mixes image sizes"):
        load_series([*a, *b])


def test_image_without_pixel_data_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(volume((4, 8, 8)), tmp_path)
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1])
    with pytest.raises(SeriesQCError, match="no pixel data"):
        load_series(paths)


def test_image_without_position_is_refused(tmp_path: Path) -> None:
    paths = write_ct_series(volume((4, 8, 8)), tmp_path)
    ds = pydicom.dcmread(paths[2])
    del ds.ImagePositionPatient
    ds.save_as(paths[2])
    with pytest.raises(SeriesQCError, match="no Image Position"):
        load_series(paths)


# -- Multi-frame, projection and compressed sample files ---------------------------


def test_enhanced_ct_frames_are_sorted_and_rescaled_per_frame(tmp_path: Path) -> None:
    vol = np.round(volume((7, 12, 10)) / 4) * 4
    slopes = [1.0, 2.0, 0.5, 4.0, 1.0, 0.25, 2.0]
    path, order = write_enhanced_ct(vol, tmp_path / "enh.dcm", slopes=slopes, seed=5)
    series = load_series([path])
    assert np.array_equal(sitk_array(series), vol)
    # Slice k came from the frame that stored slice k.
    assert series.frame_numbers == [int(np.flatnonzero(order == k)[0]) + 1 for k in range(7)]
    assert len(set(series.sop_instance_uids)) == 1
    assert series.image.GetSpacing() == pytest.approx((0.8, 0.7, 2.0))
    assert series.image.GetOrigin() == pytest.approx((-10.0, -20.0, 30.0))


def test_enhanced_ct_sample_loads() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    series = load_series([path])
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    assert series.image.GetSize() == (512, 512, 2)
    # Normal (0, 0, -1): frame 2 (z = -149) comes before frame 1 (z = -159).
    assert series.frame_numbers == [2, 1]
    assert np.array_equal(sitk_array(series), raw[[1, 0]] - 1024.0)
    assert series.image.GetSpacing() == pytest.approx((0.388672, 0.388672, 10.0))
    assert series.image.GetOrigin() == pytest.approx((99.5, -301.5, -149.0))
    assert series.sop_class_uid == EnhancedCTImageStorage


def test_multiframe_without_positions_is_refused() -> None:
    # This Enhanced MR sample was anonymised down to no functional groups at all.
    with pytest.raises(SeriesQCError, match="10 frames without a position"):
        load_series([get_testdata_file("emri_small.dcm")])


def test_cr_is_a_projection_with_monochrome1_inverted() -> None:
    path = get_testdata_file("RG1_UNCI.dcm")
    series = load_series([path])
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert series.is_projection
    assert series.image.GetSize() == (1841, 1955, 1)
    # Pixel Spacing is 0\0 in this file: unknown, so 1 mm is assumed and said.
    assert series.image.GetSpacing() == (1.0, 1.0, 1.0)
    assert any("no pixel spacing" in w for w in series.warnings)
    expected = (2.0 ** int(ds.BitsStored) - 1) - ds.pixel_array.astype(np.float32)
    assert np.array_equal(sitk_array(series)[0], expected)


def test_cr_series_of_several_images_is_refused(tmp_path: Path) -> None:
    src = Path(get_testdata_file("RG1_UNCI.dcm"))
    copy = tmp_path / "view2.dcm"
    shutil.copy(src, copy)
    edit(copy, SOPInstanceUID=generate_uid())
    with pytest.raises(SeriesQCError, match="each projection image is analysed on its own"):
        load_series([src, copy])


def test_modality_lut_is_applied_to_a_2d_image() -> None:
    # A secondary capture: no patient geometry, a Modality LUT instead of a rescale.
    path = get_testdata_file("mlut_18.dcm")
    ds = pydicom.dcmread(path)
    series = load_series([path])
    assert series.is_projection
    expected = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    assert not np.array_equal(expected, ds.pixel_array)  # the LUT really changes values
    assert np.array_equal(sitk_array(series)[0], expected)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_compressed_mr_loads_like_uncompressed(name: str) -> None:
    reference = load_series([get_testdata_file("MR_small.dcm")])
    series = load_series([get_testdata_file(name)])
    assert series.image.GetSize() == (64, 64, 1)
    assert np.array_equal(sitk_array(series), sitk_array(reference))
    assert series.image.GetOrigin() == reference.image.GetOrigin()
    assert series.image.GetDirection() == reference.image.GetDirection()


def test_jpeg2000_cr_loads_like_uncompressed() -> None:
    reference = load_series([get_testdata_file("RG1_UNCR.dcm")])
    series = load_series([get_testdata_file("RG1_J2KR.dcm")])
    assert np.array_equal(sitk_array(series), sitk_array(reference))


# -- Grouping a study ---------------------------------------------------------------


def test_choose_series_groups_by_series_and_splits_projections(tmp_path: Path) -> None:
    study = generate_uid()
    thin = write_ct_series(
        volume((6, 8, 8)), tmp_path / "thin", study_uid=study, series_description="Lung 1mm"
    )
    thick = write_ct_series(
        volume((3, 8, 8)), tmp_path / "thick", study_uid=study, spacing=(2.0, 0.7, 0.7)
    )
    cr = [tmp_path / "cr1.dcm", tmp_path / "cr2.dcm"]
    for path in cr:
        shutil.copy(get_testdata_file("RG1_UNCI.dcm"), path)
        edit(path, SOPInstanceUID=generate_uid(), StudyInstanceUID=study)
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.Modality, sr.SeriesInstanceUID, sr.StudyInstanceUID = "SR", generate_uid(), study
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not DICOM")

    files = [*thin, *thick, *cr, tmp_path / "report.dcm", tmp_path / "notes.txt"]
    found = choose_series(files)
    ct = [s for s in found if s.modality == "CT"]
    assert sorted(s.n_slices for s in ct) == [3, 6]
    by_count = {s.n_slices: s for s in ct}
    assert set(by_count[6].paths) == set(thin)
    assert by_count[6].series_description == "Lung 1mm"
    assert by_count[6].body_part == "CHEST"
    projections = [s for s in found if s.modality == "CR"]
    assert len(projections) == 2  # one entry per view, same series UID
    assert len({s.series_instance_uid for s in projections}) == 1
    assert {p for s in projections for p in s.paths} == set(cr)
    assert all(s.study_instance_uid == study for s in found)
    assert len(found) == 4  # the SR and the text file are left out
