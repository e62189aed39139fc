"""Held-out measurement of the 3D nodule segmentation network, in MONAI's own pipeline.

The test volumes come from a *shifted* generator: thicker slices (3 mm, the
network was trained on 2 mm), finer in-plane pixels (0.9 mm) and 20 HU more
noise than any training phantom. Each is run the way the bundle's
configs/inference.json says (Spacing to 2 mm, bilinear; ScaleIntensityRange;
a Gaussian-weighted sliding window; softmax, argmax), and the label map is
resampled back (nearest neighbour) onto the source grid, where the phantom's
true nodule mask lives: per-volume Dice, and per lesion whether any predicted
connected component touches it; components touching none are false positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, ScaleIntensityRange, Spacing

from model.intervals import Interval, wilson
from model.phantom import phantom_nodule_mask, phantom_volume

PIXDIM = 2.0
HU_RANGE = (-1000.0, 500.0)
ROI = (64, 64, 64)
# LPS <-> RAS: DICOM's patient axes point to Left and Posterior, MONAI's to Right, Anterior.
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

SHIFTED_SPACING = (3.0, 0.9, 0.9)  # (slice, row, column) mm
SHIFTED_EXTRA_NOISE_HU = 20.0


@dataclass(frozen=True)
class Case:
    """A phantom on its source grid: HU (z, y, x) in LPS, spacing (z, y, x) mm, truth."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    truth: np.ndarray  # bool (z, y, x); all False without a nodule


def case_seed(seed: int, split: int, index: int, part: int) -> np.random.SeedSequence:
    """One seed per (split, volume, part): a test volume is the same whatever else was drawn."""
    return np.random.SeedSequence(entropy=seed, spawn_key=(split, index, part))


def shifted_case(seed: int, index: int, lesion: bool) -> Case:
    """A held-out chest CT from the shifted generator (module docstring)."""
    geometry = np.random.default_rng(case_seed(seed, 2, index, 0))
    sz, sy, sx = SHIFTED_SPACING
    size = int(round(geometry.uniform(340.0, 400.0) / sx))
    n_slices = int(geometry.integers(30, 46))
    phantom = case_seed(seed, 2, index, 1)
    hu, _ = phantom_volume(phantom, n_slices, size, size, SHIFTED_SPACING, lesion=lesion)
    # Extra noise from its own stream, so the mask below replays the same anatomy.
    noise = np.random.default_rng(case_seed(seed, 2, index, 2)).normal(
        0.0, SHIFTED_EXTRA_NOISE_HU, hu.shape)
    hu = np.clip(np.round(hu + noise), -1024, 3071).astype(np.int16)
    truth = (phantom_nodule_mask(phantom, n_slices, size, size, SHIFTED_SPACING) if lesion
             else np.zeros(hu.shape, dtype=bool))
    return Case(hu, (sz, sy, sx), truth)


def lps_affine(shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """The phantom grid's 4x4 LPS affine of index (x, y, z): centred, axis-aligned."""
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape_zyx[::-1], spacing_zyx[::-1],
                                                        strict=True)]
    return affine


def ras_metatensor(hu_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> MetaTensor:
    """(1, X, Y, Z) in MONAI's RAS orientation, as LoadImage + Orientation("RAS") would give.

    From an axial LPS (z, y, x) array: flip rows and columns (towards Anterior
    and Right), then transpose to (x, y, z). The affine follows the flips.
    """
    arr = np.ascontiguousarray(hu_zyx[:, ::-1, ::-1].transpose(2, 1, 0), dtype=np.float32)
    flip = np.eye(4)
    for axis in (0, 1):  # index i of the flipped array is n - 1 - i of the source
        flip[axis, axis] = -1.0
        flip[axis, 3] = arr.shape[axis] - 1
    affine = LPS_RAS @ lps_affine(hu_zyx.shape, spacing_zyx) @ flip
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(affine))


def preprocessing() -> Compose:
    """The bundle's transforms after Orientation (configs/inference.json)."""
    return Compose([
        Spacing(pixdim=(PIXDIM,) * 3, mode="bilinear"),
        ScaleIntensityRange(a_min=HU_RANGE[0], a_max=HU_RANGE[1], b_min=0.0, b_max=1.0,
                            clip=True),
    ])


def inferer() -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=ROI, sw_batch_size=4, overlap=0.25, mode="gaussian")


def label_to_source(label_xyz: np.ndarray, ras: np.ndarray, case_shape: tuple[int, ...],
                    spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """A label map on a RAS grid, nearest-neighbour onto the phantom's source grid (z, y, x)."""
    lps = LPS_RAS @ ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_xyz.transpose(2, 1, 0),
                                                        dtype=np.uint8))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    target = lps_affine(case_shape, spacing_zyx)
    reference = sitk.Image([int(n) for n in case_shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    reference.SetOrigin([float(v) for v in target[:3, 3]])
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(np.uint8)


@torch.no_grad()
def predict_case(network: torch.nn.Module, case: Case) -> np.ndarray:
    """The argmax label map of `case` on its source grid, (z, y, x) uint8."""
    image = preprocessing()(ras_metatensor(case.hu, case.spacing))
    assert isinstance(image, MetaTensor)
    logits = inferer()(image.as_tensor()[None], network)
    assert isinstance(logits, torch.Tensor)
    label = torch.softmax(logits[0], dim=0).argmax(0).numpy().astype(np.uint8)
    return label_to_source(label, image.affine.numpy(), case.hu.shape, case.spacing)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean volume: labels (0 = none) and their count."""
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    labels = sitk.GetArrayFromImage(cc)
    return labels, int(labels.max())


@dataclass(frozen=True)
class CaseScore:
    dice: float | None  # None without a nodule (undefined)
    found: bool | None  # a predicted component overlaps the nodule; None without one
    false_positives: int  # predicted components overlapping no nodule


def score(pred: np.ndarray, truth: np.ndarray) -> CaseScore:
    p, t = pred.astype(bool), truth.astype(bool)
    labels, n = components(p)
    hits = set(np.unique(labels[t]).tolist()) - {0}
    if not t.any():
        return CaseScore(None, None, n)
    dice = 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())
    return CaseScore(dice, bool(hits), n - len(hits))


def _interval(iv: Interval) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)

    return {"estimate": r(iv.estimate), "low": r(iv.low), "high": r(iv.high),
            "numerator": iv.numerator, "denominator": iv.denominator}


def summarise(scores: list[CaseScore]) -> dict[str, object]:
    """Per-volume Dice and lesion-level figures, with 95 % Wilson intervals where proportions."""
    dice = [s.dice for s in scores if s.dice is not None]
    found = [s.found for s in scores if s.found is not None]
    fps = [s.false_positives for s in scores]
    clean = sum(1 for s in scores if s.false_positives == 0)
    good = sum(1 for d in dice if d > 0.5)
    return {
        "n_volumes_with_nodule": len(dice),
        "n_volumes_without_nodule": len(scores) - len(dice),
        "dice_mean": round(float(np.mean(dice)), 4) if dice else None,
        "dice_median": round(float(np.median(dice)), 4) if dice else None,
        "dice_min": round(float(np.min(dice)), 4) if dice else None,
        # A proportion of volumes, so it gets an interval; the mean above does not.
        "dice_above_0_5": _interval(wilson(good, len(dice))),
        "lesion_sensitivity": _interval(wilson(sum(found), len(found))),
        "false_positives_per_volume": round(float(np.mean(fps)), 4) if fps else None,
        "volumes_free_of_false_positives": _interval(wilson(clean, len(scores))),
    }


def evaluate(network: torch.nn.Module, seed: int, n_positive: int, n_negative: int
             ) -> dict[str, object]:
    """The network on n_positive + n_negative shifted-generator volumes."""
    network.eval()
    scores = []
    for index in range(n_positive + n_negative):
        case = shifted_case(seed, index, lesion=index < n_positive)
        scores.append(score(predict_case(network, case), case.truth))
    return summarise(scores)
