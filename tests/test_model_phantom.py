"""Synthetic phantoms: deterministic, anatomically plausible, lesion where it says."""

from __future__ import annotations

import numpy as np
import pytest

from model.phantom import (
    LUNG_HU,
    NODULE_RADIUS_MM,
    phantom_radiograph,
    phantom_slice,
    phantom_volume,
)


def test_same_seed_same_slice_and_volume() -> None:
    a, ca = phantom_slice(7, 128, 128, (2.8, 2.8), lesion=True)
    b, cb = phantom_slice(7, 128, 128, (2.8, 2.8), lesion=True)
    assert np.array_equal(a, b) and ca == cb
    va, vca = phantom_volume(3, 6, 96, 96, (2.5, 3.5, 3.5), lesion=True)
    vb, vcb = phantom_volume(np.random.default_rng(3), 6, 96, 96, (2.5, 3.5, 3.5), lesion=True)
    assert np.array_equal(va, vb) and vca == vcb


def test_different_seeds_vary() -> None:
    imgs = [phantom_slice(s, 128, 128, (2.8, 2.8))[0] for s in range(4)]
    for i in range(3):
        assert not np.array_equal(imgs[i], imgs[i + 1])
    # Anatomy varies, not only noise: lung area differs between seeds.
    lung_areas = {int(((img > -950) & (img < -700)).sum()) for img in imgs}
    assert len(lung_areas) == 4


def test_slice_anatomy_hu_ranges() -> None:
    img, center = phantom_slice(0, 256, 256, (1.4, 1.4), lesion=False)
    assert img.dtype == np.int16 and img.shape == (256, 256)
    assert center is None
    assert np.median(img[:4, :4]) < -950  # air in the corner
    assert np.median(img[128, 128]) > -200  # mediastinum
    lung = img[(img > -950) & (img < -700)]
    assert lung.size > 0.1 * img.size and abs(np.median(lung) - LUNG_HU) < 30
    assert (img > 500).sum() > 100  # spine and ribs


@pytest.mark.parametrize("seed", range(6))
def test_lesion_is_a_soft_tissue_blob_inside_lung(seed: int) -> None:
    spacing = 1.0
    img, center = phantom_slice(seed, 300, 300, (spacing, spacing), lesion=True)
    assert center is not None
    r, c = center
    assert -60 < img[r - 1 : r + 2, c - 1 : c + 2].mean() < 120  # the nodule: soft tissue
    # Lung all around it, just outside its largest possible radius.
    ring = int(NODULE_RADIUS_MM[1] * 1.2 / spacing) + 4
    around = [img[r - ring, c], img[r + ring, c], img[r, c - ring], img[r, c + ring]]
    assert sum(v < -600 for v in around) >= 3  # a vessel may cross one point


def test_volume_lesion_spans_several_slices() -> None:
    vol, center = phantom_volume(11, 30, 160, 160, (2.0, 2.2, 2.2), lesion=True)
    assert vol.shape == (30, 160, 160) and vol.dtype == np.int16
    assert center is not None
    z, y, x = center
    assert 0 <= z < 30
    blob = [vol[k, y - 1 : y + 2, x - 1 : x + 2].mean() > -300 for k in range(30)]
    assert blob[z] and sum(blob) >= 3  # radius >= 4 mm at 2 mm slices
    assert not blob[(z + 15) % 30]  # and not everywhere


def test_volume_without_lesion() -> None:
    vol, center = phantom_volume(5, 4, 64, 64, (5.0, 6.0, 6.0), lesion=False)
    assert center is None and vol.shape == (4, 64, 64)


def test_radiograph_is_deterministic_with_a_visible_nodule() -> None:
    a, ca = phantom_radiograph(4, 256, 220, (1.6, 1.6), lesion=True)
    b, cb = phantom_radiograph(4, 256, 220, (1.6, 1.6), lesion=True)
    assert a.dtype == np.uint16 and a.shape == (256, 220)
    assert np.array_equal(a, b) and ca == cb and ca is not None
    clear, none = phantom_radiograph(4, 256, 220, (1.6, 1.6), lesion=False)
    assert none is None
    # One seed gives the same image with and without the nodule: the
    # difference is the nodule alone, a brighter disc around its centre.
    diff = a.astype(float) - clear.astype(float)
    r, c = ca
    assert diff[r, c] > 100 and diff.min() >= 0
    rows, cols = np.nonzero(diff > 0)
    assert abs(rows.mean() - r) < 1.5 and abs(cols.mean() - c) < 1.5
    assert 2 * 5 / 1.6 - 2 <= rows.max() - rows.min() <= 2 * 15 / 1.6 + 2  # 5-15 mm radius
    # Lungs (air) are darker than the spine/mediastinum column.
    assert np.median(a[100:140, 40:70]) < np.median(a[100:140, 100:120])
