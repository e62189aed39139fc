"""The located region follows the lesion on the source image (model/region.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_io.series import load_series
from dicom_io.synthetic import write_ct_series
from model.analysis import analyse_series
from model.phantom import phantom_nodule_mask, phantom_volume
from model.region import locate_region
from model.registry import builtin_model_dirs, load_model


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    d2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def test_box_follows_the_lesion_not_the_coarse_saliency() -> None:
    image = np.full((128, 128), -850.0)  # lung
    image[_disc(image.shape, (60, 70), 5)] = 30.0  # a 10-pixel nodule
    saliency = _blob(image.shape, (52, 64), 12.0)  # wide and off centre, as Grad-CAM is
    region = locate_region(image, saliency)
    assert region.refined
    c0, r0, c1, r1 = region.box
    assert (c0, r0, c1, r1) == (65.0, 55.0, 76.0, 66.0)
    assert region.point == pytest.approx((70.5, 60.5), abs=0.1)


def test_a_structure_cut_by_the_window_loses_to_one_inside_it() -> None:
    image = np.full((128, 128), -850.0)
    image[_disc(image.shape, (64, 64), 4)] = 30.0  # nodule
    image[:, 40:44] = 30.0  # a long vessel crossing the whole window, nearer the peak
    saliency = _blob(image.shape, (64, 55), 10.0)
    region = locate_region(image, saliency)
    assert region.refined
    assert region.box == (60.0, 60.0, 69.0, 69.0)


def test_flat_image_keeps_the_saliency_region() -> None:
    image = np.zeros((64, 64))
    saliency = _blob(image.shape, (30, 30), 5.0)
    region = locate_region(image, saliency)
    assert not region.refined
    c0, r0, c1, r1 = region.box
    assert (c0 + c1) / 2 == pytest.approx(30.5) and (r0 + r1) / 2 == pytest.approx(30.5)
    assert region.point == (30.5, 30.5)


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ"):
        locate_region(np.zeros((4, 4)), np.zeros((4, 5), dtype=np.float32))


SPACING = (2.5, 1.4, 1.4)


@pytest.mark.parametrize("seed", [1000, 1003, 1007])
def test_builtin_model_region_fits_the_phantom_nodule(seed: int, tmp_path: Path) -> None:
    """On phantoms, where the truth is known: box centre within 3 mm, size within 30 %.

    bench/region.py measures the same over more studies, beside the saliency region.
    """
    model = next(
        m for m in (load_model(d, device="cpu") for d in builtin_model_dirs())
        if "CT" in m.manifest.applies_to.modalities
    )
    volume, _ = phantom_volume(seed, lesion=True, spacing=SPACING)
    truth = phantom_nodule_mask(seed, spacing=SPACING)
    series = load_series(write_ct_series(volume, tmp_path, spacing=SPACING, seed=seed))
    finding = analyse_series(series, model).findings[0]
    assert finding.present and finding.location is not None and finding.location.box is not None
    key = series.sop_instance_uids.index(finding.location.sop_instance_uid)
    rows, cols = np.nonzero(truth[key])
    assert rows.size, "the key image holds the nodule"
    c0, r0, c1, r1 = finding.location.box
    error_mm = np.hypot(
        ((c0 + c1) / 2 - (cols.mean() + 0.5)) * SPACING[2],
        ((r0 + r1) / 2 - (rows.mean() + 0.5)) * SPACING[1],
    )
    assert error_mm < 3.0
    width, height = cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()
    assert 0.7 < (c1 - c0) / width < 1.3 and 0.7 < (r1 - r0) / height < 1.3
