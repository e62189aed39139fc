"""Saliency on the network grid, mapped onto the source images a viewer shows.

The analysis of every model kind ends here: a map on the preprocessed grid
(Grad-CAM, a model's own class-activation map, a detector's boxes) becomes,
for the few source images it reaches, a map on their own pixels.
"""

from __future__ import annotations

import numpy as np

from dicom_io.series import LoadedSeries
from model.preprocess import Preprocessed, source_slices_covering, to_source_grid
from model.results import SaliencyMap


def map_saliency(
    saliency: np.ndarray | None, pre: Preprocessed, series: LoadedSeries
) -> dict[int, np.ndarray]:
    """Saliency on the source images it reaches: source slice index -> (rows, cols).

    Grad-CAM fills a few slices only; each run of consecutive network slices
    is resampled onto the few source slices it reaches, rather than mapping
    a mostly empty map onto every slice of a 300-slice series (1.5 s).
    """
    if saliency is None:
        return {}
    nonzero = np.flatnonzero(saliency.reshape(saliency.shape[0], -1).max(axis=1) > 0.0)
    slabs: list[tuple[int, int]] = []
    for run in np.split(nonzero, np.flatnonzero(np.diff(nonzero) > 1) + 1):
        if run.size == 0:
            continue
        first, stop = source_slices_covering(pre, series, [int(run[0]), int(run[-1])])
        if slabs and first <= slabs[-1][1]:
            slabs[-1] = (min(slabs[-1][0], first), max(slabs[-1][1], stop))
        else:
            slabs.append((first, stop))
    planes: dict[int, np.ndarray] = {}
    for first, stop in slabs:
        mapped = np.clip(to_source_grid(saliency, pre, series, slices=(first, stop)), 0.0, 1.0)
        for offset in range(stop - first):
            planes[first + offset] = mapped[offset]
    return planes


def saliency_map_of(
    saliency: np.ndarray, pre: Preprocessed, series: LoadedSeries
) -> SaliencyMap | None:
    """A map on the network grid (slices, rows, cols) as the saliency objects take it."""
    return saliency_map(series, map_saliency(saliency, pre, series))


def saliency_map(series: LoadedSeries, planes: dict[int, np.ndarray]) -> SaliencyMap | None:
    """The source images the saliency reaches, in slice order; empty images are left out."""
    ks = sorted(k for k, plane in planes.items() if float(plane.max()) > 0.0)
    if not ks:
        return None
    return SaliencyMap(
        series_instance_uid=series.series_instance_uid,
        source_sop_instance_uids=[series.sop_instance_uids[k] for k in ks],
        frames=np.ascontiguousarray(np.stack([planes[k] for k in ks]), dtype=np.float32),
        source_frame_numbers=(
            [series.frame_numbers[k] for k in ks] if series.frame_numbers is not None else None
        ),
    )
