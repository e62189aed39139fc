"""The analysis glue: aggregation, key slice, location on the source image, study routing.

The model here is a TEST DOUBLE (`BrightSpotDouble`), not a network: its
"probability" is how much of a slice is bright and its "saliency" is where.
That makes the expected key slice, point and box known in advance; the real
network is exercised end to end elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_io.series import choose_series, load_series
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series, analyse_study
from model.inference import Prediction
from model.manifest import AppliesTo, Code, InputSpec, ModelManifest, OutputLabel, WeightsSpec
from model.registry import LoadedModel
from model.results import AlgorithmInfo, Outcome
from tests.test_series import write_enhanced_ct

SHAPE = (12, 64, 64)
SPACING = (2.0, 0.7, 0.7)
# The spot: biggest on slice 6 (rows 20-31, columns 36-47), smaller on 5 and 7.
KEY_SLICE, ROWS, COLS = 6, (20, 32), (36, 48)


class BrightSpotDouble:
    """TEST DOUBLE for `model.registry.LoadedModel` (same interface, no network).

    Label "spot": probability = 24 x the fraction of pixels above 0.9 after
    windowing; saliency = those pixels. Label "quiet": 1 - that probability,
    with no saliency of its own, so its key slice has no location.
    Applicability is the real `LoadedModel.applicability`, reading this manifest.
    """

    applicability = LoadedModel.applicability

    def __init__(self, *, modalities: tuple[str, ...] = ("CT",), min_slices: int = 3) -> None:
        self.manifest = ModelManifest(
            name="spot-double",
            version="0.0",
            applies_to=AppliesTo(modalities=list(modalities), min_slices=min_slices),
            input=InputSpec(denoise="none"),
            labels=[
                OutputLabel(
                    name="spot",
                    finding=Code(value="27925004", scheme="SCT", meaning="Nodule"),
                    site=Code(value="39607008", scheme="SCT", meaning="Lung"),
                ),
                OutputLabel(
                    name="quiet",
                    finding=Code(value="X1", scheme="99SECONDREADER", meaning="Quiet"),
                    site=Code(value="39607008", scheme="SCT", meaning="Lung"),
                ),
            ],
            threshold=0.5,
            weights=WeightsSpec(file="none.pt", sha256="0" * 64),
        )
        self.seen: list[np.ndarray] = []

    def predict(self, slices: np.ndarray) -> Prediction:
        self.seen.append(slices)
        bright = (slices > 0.9).astype(np.float32)
        spot = np.clip(24.0 * bright.mean(axis=(1, 2)), 0.0, 1.0)
        probabilities = np.stack([spot, 1.0 - spot], axis=1).astype(np.float32)
        return Prediction(probabilities, bright)

    def algorithm_info(self) -> AlgorithmInfo:
        return AlgorithmInfo("spot-double", "0.0", "tests", "2.25.1")


def spot_volume() -> np.ndarray:
    vol = np.full(SHAPE, -1000.0, dtype=np.float32)
    vol[KEY_SLICE, ROWS[0] : ROWS[1], COLS[0] : COLS[1]] = 400.0
    for k in (KEY_SLICE - 1, KEY_SLICE + 1):
        vol[k, 23:29, 39:45] = 400.0
    return vol


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_finding_is_located_on_the_key_source_image(tmp_path: Path) -> None:
    paths = write_ct_series(spot_volume(), tmp_path, spacing=SPACING)
    double = BrightSpotDouble()
    result = analyse_series(load_series(paths), double)
    assert result.outcome == Outcome.ANALYSED
    assert result.algorithm is not None and result.algorithm.name == "spot-double"
    spot, quiet = result.findings
    # The study probability is the key slice's: the maximum over slices.
    per_slice = 24.0 * (double.seen[0] > 0.9).mean(axis=(1, 2))
    assert int(np.argmax(per_slice)) == KEY_SLICE
    assert spot.probability == pytest.approx(per_slice.max())
    assert spot.present and spot.threshold == 0.5
    assert (spot.finding_type.value, spot.finding_site.meaning) == ("27925004", "Lung")
    loc = spot.location
    assert loc is not None
    assert loc.sop_instance_uid == uid_of(paths[KEY_SLICE])
    assert loc.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert loc.frame_number is None
    col, row = loc.point
    assert COLS[0] < col < COLS[1] and ROWS[0] < row < ROWS[1]
    # SCOORD box around the whole spot, to within the half-pixel the resampling blurs.
    assert loc.box == pytest.approx((COLS[0], ROWS[0], COLS[1], ROWS[1]), abs=1.0)
    # "quiet" peaks on a slice without any spot: no saliency there, no location.
    assert quiet.probability == pytest.approx(1.0)
    assert quiet.location is None


def test_saliency_lies_on_the_source_images_it_reaches(tmp_path: Path) -> None:
    paths = write_ct_series(spot_volume(), tmp_path, spacing=SPACING)
    series = load_series(paths)
    result = analyse_series(series, BrightSpotDouble())
    sal = result.saliency
    assert sal is not None
    assert sal.series_instance_uid == series.series_instance_uid
    assert sal.source_sop_instance_uids == [uid_of(paths[k]) for k in (5, 6, 7)]
    assert sal.frames.dtype == np.float32 and sal.frames.shape == (3, 64, 64)
    assert sal.frames.min() >= 0.0 and sal.frames.max() <= 1.0
    inside = sal.frames[1, ROWS[0] + 1 : ROWS[1] - 1, COLS[0] + 1 : COLS[1] - 1]
    assert inside.min() == pytest.approx(1.0)
    assert sal.frames[1, :10].max() == 0.0  # far from the spot
    assert sal.source_frame_numbers is None


def test_provenance_records_every_step(tmp_path: Path) -> None:
    paths = write_ct_series(spot_volume(), tmp_path, spacing=SPACING)
    double = BrightSpotDouble()
    result = analyse_series(load_series(paths), double)
    names = [p["name"] for p in result.provenance]
    assert names == ["load", "orientation", "resample", "denoise", "contrast", "inference"]
    # What the double saw is what the preprocessing promised: 12 slices, 128x128, [0, 1].
    (seen,) = double.seen
    assert seen.shape == (12, 128, 128) and seen.min() >= 0.0 and seen.max() <= 1.0


def test_flipped_series_points_at_the_same_anatomy(tmp_path: Path) -> None:
    vol = spot_volume()
    nz, _, nx = vol.shape
    origin = (-20.0 + (nx - 1) * SPACING[2], -30.0, 50.0 + (nz - 1) * SPACING[0])
    paths = write_ct_series(
        vol[::-1, :, ::-1].copy(),
        tmp_path,
        spacing=SPACING,
        origin=origin,
        row_direction=(-1.0, 0.0, 0.0),
        slice_direction=(0.0, 0.0, -1.0),
    )
    result = analyse_series(load_series(paths), BrightSpotDouble())
    loc = result.findings[0].location
    assert loc is not None
    assert loc.sop_instance_uid == uid_of(paths[nz - 1 - KEY_SLICE])
    # Columns run the other way on these images: the box is mirrored.
    mirrored = (nx - COLS[1], ROWS[0], nx - COLS[0], ROWS[1])
    assert loc.box == pytest.approx(mirrored, abs=1.0)


def test_multiframe_location_names_the_frame(tmp_path: Path) -> None:
    path, order = write_enhanced_ct(spot_volume(), tmp_path / "enh.dcm", spacing=SPACING)
    result = analyse_series(load_series([path]), BrightSpotDouble())
    loc = result.findings[0].location
    assert loc is not None
    stored_frame = int(np.flatnonzero(order == KEY_SLICE)[0]) + 1
    assert loc.frame_number == stored_frame
    sal = result.saliency
    assert sal is not None and sal.source_frame_numbers is not None
    assert stored_frame in sal.source_frame_numbers
    assert len(set(sal.source_sop_instance_uids)) == 1


def study(tmp_path: Path, *, skip: tuple[int, ...] = ()) -> list[Path]:
    """A CT study: a 12-slice series with a spot, a 4-slice thick series, and a CR."""
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    thin = write_ct_series(
        spot_volume(), tmp_path / "thin", spacing=SPACING, study_uid=study_uid, skip_slices=skip
    )
    thick = write_ct_series(
        spot_volume()[::3], tmp_path / "thick", study_uid=study_uid, spacing=(6.0, 0.7, 0.7)
    )
    return [*thin, *thick, Path(get_testdata_file("RG1_UNCI.dcm"))]


def test_study_uses_the_applicable_series_with_most_slices(tmp_path: Path) -> None:
    files = study(tmp_path)
    series = choose_series(files)
    (result,) = analyse_study(series, [BrightSpotDouble()])
    thin_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert result.outcome == Outcome.ANALYSED
    assert result.series_instance_uid == thin_uid
    assert result.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert result.findings[0].present


def test_study_without_a_fitting_series_is_not_applicable(tmp_path: Path) -> None:
    series = choose_series(study(tmp_path))
    cr_only = BrightSpotDouble(modalities=("DX",))
    too_many = BrightSpotDouble(min_slices=50)
    # No model applies: one result says so, with every model's reason.
    (result,) = analyse_study(series, [cr_only, too_many], study_instance_uid="1.2.3")
    assert result.outcome == Outcome.NOT_APPLICABLE
    assert result.study_instance_uid == "1.2.3" and result.series_instance_uid is None
    assert "spot-double is for DX, not modality CT" in (result.reason or "")
    assert "not modality CR" in (result.reason or "")
    assert "needs at least 50 images, the series has 12" in (result.reason or "")
    assert result.findings == [] and result.algorithm is None
    # One model that does not apply says nothing when another one ran.
    fits = BrightSpotDouble()
    (ran,) = analyse_study(series, [cr_only, fits], study_instance_uid="1.2.3")
    assert ran.outcome == Outcome.ANALYSED


def test_study_with_a_missing_slice_fails_qc(tmp_path: Path) -> None:
    files = study(tmp_path, skip=(3,))
    a, b = BrightSpotDouble(), BrightSpotDouble()
    results = analyse_study(choose_series(files), [a, b])
    for result in results:
        assert result.outcome == Outcome.FAILED_QC
        assert result.reason is not None and "1 slice missing" in result.reason
        assert result.findings == [] and result.saliency is None
    assert a.seen == [] and b.seen == []  # the network never saw the broken series
