"""The region of a finding: the lesion on its source image, not the saliency blob.

Grad-CAM saliency is coarse (the network's last feature map is 1/16 of its
input), so the region above half its peak is two to three times the size of
a small nodule and off its centre. The map says *where to look*; the image
says *what is there*. So the region is refined on the source pixels:

1. the search window is the saliency region (connected pixels at or above
   half the peak), widened by a margin;
2. inside it, Otsu's threshold splits the pixels into brighter and darker
   (a nodule, opacity or mass is denser than what surrounds it: CT in HU,
   radiographs with MONOCHROME1 already inverted by the loader);
3. of the bright connected components, the one holding the most saliency
   wins; components cut by the window's edge (chest wall, heart, a long
   vessel) count only when nothing lies wholly inside;
4. its bounding box is the region, its centroid the point.

Where no component qualifies (flat window, a lesion darker than its
surroundings, one pixel), the saliency region is kept as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# The saliency region: connected pixels at or above this fraction of the peak.
SALIENCY_FRACTION = 0.5
# The search window: the saliency region's box widened by this fraction of its size.
WINDOW_MARGIN = 0.25
# Smallest lesion component, in pixels: below it, noise.
MIN_PIXELS = 4


@dataclass(frozen=True)
class Region:
    """A located region in pixel coordinates: (column, row) points, whole-pixel box."""

    point: tuple[float, float]  # centre, SCOORD convention (pixel (r, c) centred at c+.5, r+.5)
    box: tuple[float, float, float, float]  # (col0, row0, col1, row1)
    refined: bool  # False: the saliency region, kept because refinement found nothing


def saliency_region(saliency: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The connected mask around the peak at or above half of it, and the peak (row, col)."""
    row, col = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    mask = (saliency >= SALIENCY_FRACTION * float(saliency[row, col])).astype(np.uint8)
    labels = _components(mask)
    return labels == labels[row, col], (int(row), int(col))


def locate_region(image: np.ndarray, saliency: np.ndarray) -> Region:
    """The finding's region on one source plane (`image` and `saliency` both (rows, cols))."""
    if image.shape != saliency.shape:
        raise ValueError(f"image {image.shape} and saliency {saliency.shape} differ")
    blob, peak = saliency_region(saliency)
    rows, cols = np.nonzero(blob)
    fallback = Region(
        point=(peak[1] + 0.5, peak[0] + 0.5),
        box=(float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)),
        refined=False,
    )
    refined = _refine(image, saliency, (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1))
    return refined if refined is not None else fallback


def _refine(
    image: np.ndarray, saliency: np.ndarray, bounds: tuple[int, int, int, int]
) -> Region | None:
    r0, r1, c0, c1 = bounds
    mr = max(1, round(WINDOW_MARGIN * (r1 - r0)))
    mc = max(1, round(WINDOW_MARGIN * (c1 - c0)))
    r0, r1 = max(0, r0 - mr), min(image.shape[0], r1 + mr)
    c0, c1 = max(0, c0 - mc), min(image.shape[1], c1 + mc)
    window = np.asarray(image[r0:r1, c0:c1], dtype=np.float64)
    weights = np.asarray(saliency[r0:r1, c0:c1], dtype=np.float64)
    threshold = _otsu(window)
    if threshold is None:
        return None
    labels = _components((window > threshold).astype(np.uint8))
    best: tuple[bool, float, int] | None = None  # (inside, saliency mass, label)
    for label in range(1, int(labels.max()) + 1):
        member = labels == label
        if int(member.sum()) < MIN_PIXELS:
            continue
        lr, lc = np.nonzero(member)
        inside = not (
            (lr.min() == 0 and r0 > 0)
            or (lc.min() == 0 and c0 > 0)
            or (lr.max() == window.shape[0] - 1 and r1 < image.shape[0])
            or (lc.max() == window.shape[1] - 1 and c1 < image.shape[1])
        )
        score = (inside, float(weights[member].sum()), label)
        if score[1] > 0.0 and (best is None or score[:2] > best[:2]):
            best = score
    if best is None:
        return None
    lr, lc = np.nonzero(labels == best[2])
    return Region(
        point=(float(lc.mean()) + c0 + 0.5, float(lr.mean()) + r0 + 0.5),
        box=(
            float(lc.min() + c0),
            float(lr.min() + r0),
            float(lc.max() + 1 + c0),
            float(lr.max() + 1 + r0),
        ),
        refined=True,
    )


def _otsu(values: np.ndarray, bins: int = 128) -> float | None:
    """Otsu's threshold of `values`, or None when they are (nearly) flat."""
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo < 1e-6:
        return None
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 8-connected components of a 2D mask (0 = background)."""
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask), True))
