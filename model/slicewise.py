"""Preprocessing slice by slice: the same network input, made before the study is whole.

A 2D model's input slice k depends on source slice k alone when its
manifest keeps the slices (no `slice_spacing`) and the orientation it asks
for keeps the slice axis (an axial series for an axial model): resampling,
denoising and contrast are all in-plane. Each slice can then be prepared,
and its network output computed, as soon as its image arrives
(`model/stream.py`); at completion only the last few remain.

The arithmetic is done in the plane's own frame (origin 0, unit axes, one
unit between slices), so a slice gives the same numbers bit for bit whether
it is prepared alone, with a few neighbours or with the whole series, and
the numbers of `preprocess` up to the rounding of patient coordinates
(tests/test_slicewise.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from dicom_io.series import LoadedSeries
from model.manifest import InputSpec
from model.preprocess import (
    Preprocessed,
    _contrast,
    _denoise,
    _Grid,
    _onto,
    _orientation_code,
    _output,
    contrast_params,
    denoise_params,
)


@dataclass(frozen=True)
class SlicePlan:
    """The in-plane geometry slice-wise preprocessing depends on.

    Two slices with equal plans and equal pixels give equal network slices:
    the plan is part of the key under which a prepared slice is kept.
    """

    columns: int  # of the source image
    rows: int
    spacing: tuple[float, float]  # mm between columns, between rows (source)
    transpose: bool  # the network's x axis is the source's y axis
    flip_x: bool
    flip_y: bool
    reverse: bool  # network slice k is source slice n - 1 - k


def plan_for(
    columns: int,
    rows: int,
    spacing: tuple[float, float],
    direction: np.ndarray,
    spec: InputSpec,
) -> SlicePlan | None:
    """The plan for slices of this geometry (direction: columns row, column, normal), or
    None when the model's input slice is not one source slice (slices resampled along
    the normal, an orientation that changes the slice axis, or several series)."""
    if spec.slice_spacing is not None or spec.channel_series:
        return None
    grid = _Grid(
        np.asarray([columns, rows, 1], dtype=float),
        np.asarray([spacing[0], spacing[1], 1.0], dtype=float),
        np.zeros(3),
        np.asarray(direction, dtype=float).reshape(3, 3),
    ).oriented(spec.orientation)
    if grid.axes[2] != 2:
        return None
    return SlicePlan(
        columns, rows, (float(spacing[0]), float(spacing[1])),
        grid.axes[0] == 1, grid.flipped[0], grid.flipped[1], grid.flipped[2],
    )  # fmt: skip


def series_plan(series: LoadedSeries, spec: InputSpec) -> SlicePlan | None:
    """The plan for a loaded cross-sectional series; None for a projection image."""
    if series.is_projection:
        return None
    cols, rows, _ = series.image.GetSize()
    sx, sy, _ = series.image.GetSpacing()
    direction = np.asarray(series.image.GetDirection(), dtype=float).reshape(3, 3)
    return plan_for(cols, rows, (sx, sy), direction, spec)


def prepare_slices(values: np.ndarray, plan: SlicePlan, spec: InputSpec) -> np.ndarray:
    """Source slices (n, rows, cols) in modality units -> network slices (n, rows', cols')."""
    a = np.asarray(values, dtype=np.float32)
    if a.ndim != 3 or a.shape[1:] != (plan.rows, plan.columns):
        raise ValueError(f"slices of shape {a.shape} do not fit the plan's "
                         f"{plan.rows}x{plan.columns}")  # fmt: skip
    spacing = plan.spacing
    if plan.transpose:
        a = a.transpose(0, 2, 1)
        spacing = (spacing[1], spacing[0])
    if plan.flip_x:
        a = a[:, :, ::-1]
    if plan.flip_y:
        a = a[:, ::-1, :]
    a = np.ascontiguousarray(a)
    n = a.shape[0]
    grid = _Grid(
        np.asarray([a.shape[2], a.shape[1], n], dtype=float),
        np.asarray([spacing[0], spacing[1], 1.0], dtype=float),
        np.zeros(3),
        np.eye(3),
    )
    target = _output(grid, spec)
    image = sitk.GetImageFromArray(a)
    image.SetSpacing(tuple(float(v) for v in grid.spacing))
    array = sitk.GetArrayFromImage(_onto(image, target, np.eye(3)))
    outside = np.isnan(array)
    if outside.any():
        # Each slice padded with its own minimum, as in training and `preprocess`.
        array = np.where(outside, a.min(axis=(1, 2))[:, None, None], array).astype(np.float32)
    resampled = sitk.GetImageFromArray(array)
    resampled.SetSpacing(tuple(float(v) for v in target.spacing))
    denoised, _ = _denoise(resampled, spec)
    x, _ = _contrast(sitk.GetArrayFromImage(denoised), spec)
    return x


def source_order(plan: SlicePlan, n: int) -> list[int]:
    """Source slice index of each network slice."""
    return list(range(n - 1, -1, -1)) if plan.reverse else list(range(n))


def assemble(
    series: LoadedSeries,
    spec: InputSpec,
    array: np.ndarray,
    *,
    prepared_early: int,
    seconds: float,
) -> Preprocessed:
    """The network slices of a series, prepared slice by slice, on the grid `preprocess` gives.

    `prepared_early`: how many were prepared while the study was arriving;
    `seconds`: the time spent here on the others.
    """
    started = time.perf_counter()
    grid = _Grid.of(series.image)
    oriented = grid.oriented(spec.orientation)
    target = _output(oriented, spec)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(float(v) for v in target.origin))
    image.SetSpacing(tuple(float(v) for v in target.spacing))
    image.SetDirection(tuple(float(v) for v in oriented.direction.ravel()))
    n = int(array.shape[0])
    steps: list[dict[str, object]] = [
        {
            "name": "orientation",
            "parameters": {
                "applied": True,
                "source": _orientation_code(grid.direction),
                "target": spec.orientation,
                "axes_from_source": [int(a) for a in oriented.axes],
                "flipped": [bool(f) for f in oriented.flipped],
            },
            "seconds": None,
        },
        {
            "name": "resample",
            "parameters": target.params(spec, slice_by_slice=True),
            "seconds": None,
        },
        {
            "name": "denoise",
            "parameters": denoise_params(spec, [float(v) for v in target.spacing]),
            "seconds": None,
        },
        {"name": "contrast", "parameters": contrast_params(spec), "seconds": None},
        {
            # The four steps above, slice by slice: most of them while the
            # study was still arriving, the rest here.
            "name": "slice by slice",
            "parameters": {"slices": n, "prepared_while_receiving": prepared_early},
            "seconds": round(seconds + time.perf_counter() - started, 4),
        },
    ]
    return Preprocessed(image, array, steps)
