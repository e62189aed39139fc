"""What a radiologist measures on a segmented region: volume, longest axial diameter, intensity.

All on the source series' own grid (the images the SEG lies on and the
values the modality gave), never on the network's coarser one:

- volume: voxels times the voxel's volume, in mL;
- longest axial diameter: the largest distance between two points of the
  region's outline on one axial plane (its maximum Feret diameter, taken on
  the pixels' corners, so one pixel measures one pixel across), in mm, over
  every axial plane of the region. "Axial" is the patient's: the region is
  first turned into LPS order, whatever plane the series was acquired in;
- mean and maximum of the source image over the region (HU on CT);
- where it is: the source image with the largest cross-section, its centroid
  and bounding box in that image's pixels (SCOORD coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class RegionMeasurements:
    voxels: int
    volume_ml: float
    longest_axial_diameter_mm: float
    mean: float
    maximum: float
    key_slice: int  # source slice index with the largest cross-section
    centroid: tuple[float, float]  # (column, row) on it, SCOORD
    box: tuple[float, float, float, float]  # (col0, row0, col1, row1) on it, SCOORD


def measure(mask: np.ndarray, values: np.ndarray, geometry: sitk.Image) -> RegionMeasurements:
    """One region: `mask` (slices, rows, cols) bool, `values` on the grid of `geometry`."""
    if mask.shape != values.shape or not mask.any():
        raise ValueError("the region must be non-empty and on the values' grid")
    sx, sy, sz = geometry.GetSpacing()
    inside = values[mask]
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    rows, cols = np.nonzero(mask[key])
    return RegionMeasurements(
        voxels=int(mask.sum()),
        volume_ml=float(mask.sum()) * sx * sy * sz / 1000.0,
        longest_axial_diameter_mm=longest_axial_diameter(mask, geometry),
        mean=float(inside.mean(dtype=np.float64)),
        maximum=float(inside.max()),
        key_slice=key,
        centroid=(float(cols.mean()) + 0.5, float(rows.mean()) + 0.5),
        box=(float(cols.min()), float(rows.min()), float(cols.max()) + 1.0,
             float(rows.max()) + 1.0),  # fmt: skip
    )


def longest_axial_diameter(mask: np.ndarray, geometry: sitk.Image) -> float:
    """The largest in-plane Feret diameter over the region's axial planes, in mm."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(geometry)
    axial = sitk.DICOMOrient(image, "LPS")  # index z is then the patient's axial planes
    array = sitk.GetArrayViewFromImage(axial)
    sx, sy, _ = axial.GetSpacing()
    best = 0.0
    for plane in np.nonzero(array.reshape(array.shape[0], -1).any(axis=1))[0]:
        best = max(best, feret_diameter(array[plane].astype(bool), (sy, sx)))
    return best


def feret_diameter(plane: np.ndarray, spacing_yx: tuple[float, float]) -> float:
    """The largest distance between corners of the pixels of `plane` (rows, cols), in mm."""
    rows, cols = np.nonzero(plane)
    if rows.size == 0:
        return 0.0
    # Only pixels on the outline can hold the farthest corners.
    padded = np.pad(plane, 1)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = plane & ~interior
    rows, cols = np.nonzero(edge)
    corners = np.concatenate([np.stack([rows + dr, cols + dc], axis=1)
                              for dr in (0, 1) for dc in (0, 1)]).astype(np.float64)  # fmt: skip
    corners *= np.asarray(spacing_yx)
    hull = convex_hull(np.unique(corners, axis=0))
    if len(hull) == 1:
        return 0.0
    diff = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=2)).max())


def convex_hull(points: np.ndarray) -> np.ndarray:
    """The vertices of the convex hull of (n, 2) points (Andrew's monotone chain)."""
    pts = points[np.lexsort((points[:, 1], points[:, 0]))]
    if len(pts) <= 2:
        return pts

    def half(seq: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.asarray(lower[:-1] + upper[:-1])
