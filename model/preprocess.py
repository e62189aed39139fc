"""Shape a loaded series the way a model's manifest asks, and map results back.

This is the production side of the contract whose training side is
`model.datasets.network_input`: per axial slice the same arithmetic in the
same order, so the network sees in production what it saw in training.

1. orientation: the axes `sitk.DICOMOrient` gives for `spec.orientation`,
   applied through the resampling grid rather than by copying the volume
   (skipped for projection images, which have no patient axes);
2. resample (linear): in-plane onto `spec.size`, fitting the field of view
   with each axis scaled on its own when `spec.spacing` is None, else
   `spec.spacing` mm about the image centre; outside the image is the
   slice's minimum (air). Slices are kept unless `spec.slice_spacing` is set;
3. denoise, in-plane: recursive Gaussian of `spec.denoise_sigma_mm`, or
   CurvatureFlow with a stable time step, or none. In-plane because the
   network reads single slices and slice thickness differs between series:
   smoothing across slices would make the input depend on it;
4. contrast: window (center, width) mapped linearly to [0, 1] and clipped;
   "histogram": each slice's 1st..99th percentile mapped to [0, 1] and
   clipped (projection X-ray, MR); "zscore": each slice minus its mean,
   over its standard deviation, unclipped (MONAI's NormalizeIntensity, which
   a 2D bundle applies to the one slice it is given: a per-slice statistic,
   so the slice-wise path stays exact); or none (values left as they are).

Resampling comes before denoising: a 512x512 CT becomes 128x128 first, so
the filters touch 16 times fewer pixels. Every step is timed and recorded
with its parameters for the audit trail.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from dicom_io.series import LoadedSeries
from model.manifest import InputSpec

# Percentiles of the "histogram" contrast; the same as training.
HISTOGRAM_PERCENTILES = (1.0, 99.0)


@dataclass
class Preprocessed:
    """The network input and the grid it lies on.

    `image` carries the physical geometry (origin, spacing, direction) of
    `array`, so a map on the network grid can be resampled back onto the
    source (`to_source_grid`). `array` is float32 (slices, rows, cols).
    """

    image: sitk.Image
    array: np.ndarray
    steps: list[dict[str, object]] = field(default_factory=list)
    # (slices, channels, rows, cols) when several series are the channels
    # (`model.channels.stack`); `array` is then the reference's channel.
    channels: np.ndarray | None = None

    @property
    def network_input(self) -> np.ndarray:
        return self.channels if self.channels is not None else self.array


class _Steps:
    """Collects {"name", "parameters", "seconds"} records."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()

    def done(self, name: str, **parameters: object) -> None:
        seconds = round(time.perf_counter() - self._start, 4)
        self.records.append({"name": name, "parameters": parameters, "seconds": seconds})


def preprocess(series: LoadedSeries, spec: InputSpec) -> Preprocessed:
    """Run orientation, resampling, denoising and contrast as `spec` says."""
    steps = _Steps()

    steps.start()
    source = series.image
    grid = _Grid.of(source)
    if series.is_projection:
        steps.done("orientation", applied=False, reason="projection image: no patient axes")
    else:
        oriented = grid.oriented(spec.orientation)
        steps.done(
            "orientation",
            applied=True,
            source=_orientation_code(grid.direction),
            target=spec.orientation,
            axes_from_source=[int(a) for a in oriented.axes],
            flipped=[bool(f) for f in oriented.flipped],
        )
        grid = oriented

    steps.start()
    image, resample_params = _resample(source, grid, spec)
    steps.done("resample", **resample_params)

    steps.start()
    image, denoise_params = _denoise(image, spec)
    steps.done("denoise", **denoise_params)

    steps.start()
    array = sitk.GetArrayFromImage(image)
    array, contrast_params = _contrast(array, spec)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    steps.done("contrast", **contrast_params)
    return Preprocessed(out, array, steps.records)


def process_resampled(image: sitk.Image, series: LoadedSeries, spec: InputSpec) -> np.ndarray:
    """Another series already resampled onto a network grid (NaN outside it): padded with
    its minimum, then denoised and scaled as `preprocess` does. (slices, rows, cols)."""
    array = sitk.GetArrayFromImage(image)
    outside = np.isnan(array)
    if outside.any():
        array[outside] = float(np.nanmin(sitk.GetArrayViewFromImage(series.image)))
        filled = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
        filled.CopyInformation(image)
        image = filled
    image, _ = _denoise(image, spec)
    out, _ = _contrast(sitk.GetArrayFromImage(image), spec)
    return np.asarray(out, dtype=np.float32)


def _orientation_code(direction: np.ndarray) -> str:
    cosines = tuple(float(v) for v in np.asarray(direction).ravel())
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(cosines)


@dataclass(frozen=True)
class _Grid:
    """An image grid without pixels; `axes[j]` is the source axis behind axis j."""

    size: np.ndarray  # (x, y, z) voxels
    spacing: np.ndarray  # mm
    origin: np.ndarray  # mm, patient coordinates
    direction: np.ndarray  # 3x3, columns are the axes
    axes: tuple[int, int, int] = (0, 1, 2)
    flipped: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def of(cls, image: sitk.Image) -> _Grid:
        return cls(
            np.asarray(image.GetSize(), dtype=float),
            np.asarray(image.GetSpacing(), dtype=float),
            np.asarray(image.GetOrigin(), dtype=float),
            np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
        )

    def oriented(self, orientation: str) -> _Grid:
        """The grid `sitk.DICOMOrient` would give, without permuting a single voxel.

        DICOMOrient only permutes and flips axes, which a tiny image reveals;
        the resampler then reads the source through the new grid directly,
        saving a copy of the whole volume (0.4-1.3 s and 300 MB at 300 slices).
        """
        probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        probe.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        new_direction = np.asarray(
            sitk.DICOMOrient(probe, orientation).GetDirection(), dtype=float
        ).reshape(3, 3)
        # Signed permutation: new axis j is old axis axes[j], reversed if flipped[j].
        signed = np.rint(np.linalg.inv(self.direction) @ new_direction)
        axes = tuple(int(np.argmax(np.abs(signed[:, j]))) for j in range(3))
        flipped = tuple(bool(signed[axes[j], j] < 0) for j in range(3))
        corner = np.zeros(3)
        for j in range(3):
            if flipped[j]:
                corner[axes[j]] = self.size[axes[j]] - 1
        origin = self.origin + self.direction @ (corner * self.spacing)
        return _Grid(
            self.size[list(axes)],
            self.spacing[list(axes)],
            origin,
            new_direction,
            axes,  # type: ignore[arg-type]
            flipped,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class _Output:
    """The network grid `_resample` makes of an (oriented) source grid."""

    size: np.ndarray  # (x, y, z) voxels
    spacing: np.ndarray  # mm
    origin: np.ndarray  # mm, patient coordinates
    shift: np.ndarray  # mm along the source grid's axes: centre on centre
    keep_slices: bool
    fit: str

    def params(self, spec: InputSpec, **extra: object) -> dict[str, object]:
        out_rows, out_cols = spec.size
        return {
            "interpolation": "linear",
            "fit": self.fit,
            "size": [out_rows, out_cols, int(self.size[2])],  # rows, columns, slices
            "spacing_mm": [round(float(v), 6) for v in (self.spacing[1], self.spacing[0],
                                                         self.spacing[2])],
            "slices_kept": self.keep_slices,
            **extra,
        }  # fmt: skip


def _output(grid: _Grid, spec: InputSpec) -> _Output:
    out_rows, out_cols = spec.size
    if spec.spacing is None:
        # Fit the field of view: each axis on its own, as the training transform does.
        spacing_xy = grid.size[:2] * grid.spacing[:2] / np.asarray([out_cols, out_rows], float)
        fit = "field_of_view"
    else:
        spacing_xy = np.asarray([spec.spacing[1], spec.spacing[0]], dtype=float)
        fit = "fixed_spacing"
    n_slices = int(grid.size[2])
    keep_slices = spec.slice_spacing is None or n_slices == 1
    if keep_slices:
        size_z, spacing_z = n_slices, float(grid.spacing[2])
    else:
        spacing_z = float(spec.slice_spacing)  # type: ignore[arg-type]
        size_z = max(1, int(round(n_slices * grid.spacing[2] / spacing_z)))
    size_out = np.asarray([out_cols, out_rows, size_z], dtype=float)
    spacing_out = np.asarray([spacing_xy[0], spacing_xy[1], spacing_z], dtype=float)
    # Shift (along the grid's axes) that puts both grids' centres on one point;
    # zero along z when slices are kept, so output slice k is input slice k.
    shift = ((grid.size - 1) * grid.spacing - (size_out - 1) * spacing_out) / 2.0
    if keep_slices:
        shift[2] = 0.0
    origin = grid.origin + grid.direction @ shift
    return _Output(size_out, spacing_out, origin, shift, keep_slices, fit)


def _onto(source: sitk.Image, target: _Output, direction: np.ndarray) -> sitk.Image:
    """`source` resampled (linear) onto the target grid; NaN where the source has no data.

    NaN marks points outside the source; they get their slice's minimum
    after, as the training transform pads each slice with its own minimum.
    """
    return sitk.Resample(
        source,
        [int(v) for v in target.size],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in target.origin),
        tuple(float(v) for v in target.spacing),
        tuple(float(v) for v in np.asarray(direction, dtype=float).ravel()),
        float("nan"),
        sitk.sitkFloat32,
    )


def _resample(
    source: sitk.Image, grid: _Grid, spec: InputSpec
) -> tuple[sitk.Image, dict[str, object]]:
    """Linear resampling onto the network grid, centre on centre (as in training)."""
    target = _output(grid, spec)
    out = _onto(source, target, grid.direction)
    array = sitk.GetArrayFromImage(out)
    outside = np.isnan(array)
    padded = bool(outside.any())
    if padded:
        values = sitk.GetArrayViewFromImage(source)
        if target.keep_slices:
            array = np.where(outside, _slice_minima(values, grid)[:, None, None], array)
        else:
            array[outside] = float(values.min())
        filled = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
        filled.CopyInformation(out)
        out = filled
    return out, target.params(spec, padded=padded)


def _slice_minima(values: np.ndarray, grid: _Grid) -> np.ndarray:
    """Minimum of each slice of the (oriented) grid, from the source array (z, y, x)."""
    along = grid.axes[2]  # source axis that became the slice axis
    numpy_axis = 2 - along
    others = tuple(a for a in range(3) if a != numpy_axis)
    minima = values.min(axis=others)
    return minima[::-1] if grid.flipped[2] else minima


def denoise_params(spec: InputSpec, spacing: Sequence[float]) -> dict[str, object]:
    """What `_denoise` does to an image of this in-plane spacing, as the provenance records it."""
    if spec.denoise == "none":
        return {"method": "none"}
    if spec.denoise == "gaussian":
        sigma = float(spec.denoise_sigma_mm)
        return {"method": "gaussian", "sigma_mm": sigma, "dimensions": "in-plane"}
    # CurvatureFlow: explicit scheme, stable below min spacing / 2^(dim + 1)
    # (ITK); 2D slices here, so / 8, as in training.
    return {
        "method": "curvature_flow",
        "iterations": int(spec.denoise_iterations),
        "time_step": round(min(spacing[0], spacing[1]) / 8.0, 6),
        "dimensions": "in-plane",
    }


def contrast_params(spec: InputSpec) -> dict[str, object]:
    if spec.contrast == "none":
        return {"method": "none"}
    if spec.contrast == "window":
        if spec.window is None:
            raise ValueError("contrast 'window' needs input.window in the manifest")
        center, width = spec.window
        return {"method": "window", "center": center, "width": width}
    if spec.contrast == "zscore":
        return {"method": "zscore", "per": "slice", "nonzero": spec.zscore_nonzero}
    return {"method": "histogram", "percentiles": list(HISTOGRAM_PERCENTILES)}


def _denoise(image: sitk.Image, spec: InputSpec) -> tuple[sitk.Image, dict[str, object]]:
    params = denoise_params(spec, image.GetSpacing())
    if spec.denoise == "none":
        return image, params
    if spec.denoise == "gaussian":
        sigma = float(spec.denoise_sigma_mm)
        # SmoothingRecursiveGaussian in 2D is these two 1D passes (x, then y);
        # running them on the 3D image smooths every slice without a loop.
        out = image
        for axis in (0, 1):
            out = sitk.RecursiveGaussian(
                out, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis
            )
        return out, params
    spacing = image.GetSpacing()
    step = min(spacing[0], spacing[1]) / 8.0
    iterations = int(spec.denoise_iterations)
    array = sitk.GetArrayFromImage(image)
    for k in range(array.shape[0]):
        plane = sitk.GetImageFromArray(array[k])
        plane.SetSpacing(spacing[:2])
        # A copy, not a view: the filter's output image is a temporary.
        array[k] = sitk.GetArrayFromImage(
            sitk.CurvatureFlow(plane, timeStep=step, numberOfIterations=iterations)
        )
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out, params


def _contrast(array: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, dict[str, object]]:
    params = contrast_params(spec)
    array = np.asarray(array, dtype=np.float32)
    if spec.contrast == "none":
        # Values as they are (HU for CT). datasets.network_input clips to [0, 1]
        # even here; a model trained with "none" would need that settled first.
        return np.ascontiguousarray(array), params
    if spec.contrast == "zscore":
        return _zscore(array, spec.zscore_nonzero), params
    if spec.contrast == "window":
        assert spec.window is not None  # contrast_params checked it
        center, width = spec.window
        out = (array - (center - width / 2.0)) / width
    else:
        lo, hi = np.percentile(array, HISTOGRAM_PERCENTILES, axis=(1, 2))
        span = np.maximum(hi - lo, 1e-6)
        out = (array - lo[:, None, None]) / span[:, None, None]
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32), params


def _zscore(array: np.ndarray, nonzero: bool) -> np.ndarray:
    """MONAI's NormalizeIntensity on each slice: (x - mean) / std, population std, a std
    of 0 read as 1; with `nonzero`, statistics over the nonzero pixels, zeros kept."""
    out = np.array(array, dtype=np.float32, order="C")
    for k in range(out.shape[0]):  # per slice: a slice's numbers never depend on another's
        plane = out[k]
        mask = plane != 0 if nonzero else np.ones(plane.shape, dtype=bool)
        if not mask.any():
            continue
        values = plane[mask].astype(np.float64)
        std = float(values.std()) or 1.0
        plane[mask] = ((values - values.mean()) / std).astype(np.float32)
    return out


def to_source_grid(
    map_zyx: np.ndarray,
    pre: Preprocessed,
    series: LoadedSeries,
    *,
    slices: tuple[int, int] | None = None,
) -> np.ndarray:
    """A map on the network grid (slices, rows, cols), resampled onto the source series' grid.

    Linear interpolation through physical space, so reorientation and the
    in-plane rescale are undone together. Points the network grid does not
    cover are 0. Returns float32 (source slices, source rows, source cols);
    with `slices` = (first, stop) only those source slices (a sparse map
    need not be resampled onto a whole 300-slice series).
    """
    values = np.asarray(map_zyx, dtype=np.float32)
    if values.shape != pre.array.shape:
        raise ValueError(
            f"map of shape {values.shape} is not on the network grid {pre.array.shape}"
        )
    moving = sitk.GetImageFromArray(np.ascontiguousarray(values))
    moving.CopyInformation(pre.image)
    reference = series.image
    if slices is not None:
        first, stop = slices
        if not 0 <= first < stop <= reference.GetSize()[2]:
            raise ValueError(f"slices {slices} outside the series' {reference.GetSize()[2]}")
        cols, rows, _ = reference.GetSize()
        reference = source_grid(series, (first, 0, 0), (stop - first, rows, cols))
    out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def source_grid(series: LoadedSeries, origin: tuple[int, int, int],
                shape: tuple[int, ...]) -> sitk.Image:  # fmt: skip
    """Part of the source series' grid: `shape` (z, y, x) voxels from index `origin` (z, y, x).

    Geometry only (an empty UInt8 image): a resampler reads nothing else of
    its reference, so a map goes onto a few source images, not the series.
    """
    source = series.image
    grid = sitk.Image([max(1, int(v)) for v in reversed(shape)], sitk.sitkUInt8)
    grid.SetSpacing(source.GetSpacing())
    grid.SetDirection(source.GetDirection())
    grid.SetOrigin(source.TransformIndexToPhysicalPoint((origin[2], origin[1], origin[0])))
    return grid


def source_slices_covering(
    pre: Preprocessed, series: LoadedSeries, network_slices: Sequence[int]
) -> tuple[int, int]:
    """(first, stop) of the source slices that network slices `network_slices` can reach.

    Linear interpolation spreads network slice k over (k - 1, k + 1); the
    corners of that slab, mapped into the source, bound the source slices it
    touches. The whole series when the list is empty.
    """
    n_source = series.image.GetSize()[2]
    if len(network_slices) == 0:
        return 0, n_source
    cols, rows, _ = pre.image.GetSize()
    ks: list[float] = []
    for k in network_slices:
        for i in (-1.0, float(cols)):
            for j in (-1.0, float(rows)):
                for dz in (-1.0, 1.0):
                    point = pre.image.TransformContinuousIndexToPhysicalPoint((i, j, k + dz))
                    ks.append(series.image.TransformPhysicalPointToContinuousIndex(point)[2])
    first = max(0, int(np.floor(min(ks))))
    stop = min(n_source, int(np.ceil(max(ks))) + 1)
    if first >= stop:  # entirely outside the source: nothing to map, keep it simple
        return 0, n_source
    return first, stop
