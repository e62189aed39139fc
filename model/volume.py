"""3D models: the whole series on the model's voxel grid, and sliding-window inference over it.

`preprocess_volume` does with SimpleITK what a MONAI bundle's
Orientation, Spacing and ScaleIntensityRange do to a CT:

1. orientation: the axes `sitk.DICOMOrient` gives for `spec.orientation`
   (both name the direction each index grows towards, "RAS": to the
   patient's right, anterior, superior);
2. spacing (linear): `spec.spacing` (rows, columns) and `spec.slice_spacing`
   mm, on the grid MONAI's Spacing computes: it starts at the first voxel's
   centre and ends at the last one's, rounded to whole voxels; beyond the
   source the nearest voxel is repeated (MONAI pads with the border);
3. contrast, as for 2D models (a CT window to [0, 1], clipped, or none).
   Nothing is denoised: a 3D network reads the volume as acquired.

`sliding_window` runs the network over it in `inference.roi_size` windows
with MONAI's `sliding_window_inference` (overlap, Gaussian blending,
windows batched), the inferer MONAI bundles name: the same code, so the
same numbers. A network's array is (x, y, z) for a MONAI network
(`layout = "columns_rows"`), else (z, y, x) as SimpleITK gives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch

from dicom_io.series import LoadedSeries
from model.manifest import InferenceSpec, InputSpec
from model.preprocess import Preprocessed, contrast_params

# A network's forward pass on one batch of windows (n, c, *roi) -> (n, channels, *roi).
Forward = Callable[[np.ndarray], np.ndarray]


def preprocess_volume(series: LoadedSeries, spec: InputSpec) -> Preprocessed:
    """The series oriented, resampled onto the model's voxel grid and windowed.

    `array` is float32 (slices, rows, columns) of that grid, `image` its
    geometry, so that a map on it goes back to the source (`to_source_grid`).
    """
    if spec.spacing is None or spec.slice_spacing is None:
        raise ValueError("a 3d input needs spacing and slice_spacing")
    steps: list[dict[str, object]] = []
    started = time.perf_counter()
    oriented = sitk.DICOMOrient(series.image, spec.orientation)
    steps.append({"name": "orientation", "parameters": {"orientation": spec.orientation},
                  "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip
    started = time.perf_counter()
    spacing = (spec.spacing[1], spec.spacing[0], spec.slice_spacing)  # x, y, z
    size = [int(round((n - 1) * s_in / s_out)) + 1
            for n, s_in, s_out in zip(oriented.GetSize(), oriented.GetSpacing(), spacing,
                                      strict=True)]  # fmt: skip
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin(oriented.GetOrigin())
    grid.SetDirection(oriented.GetDirection())
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(grid)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    resampled = resampler.Execute(oriented)
    steps.append({"name": "resample", "parameters": {
        "spacing_mm": list(spacing), "size": size, "interpolation": "linear"},
        "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip
    started = time.perf_counter()
    array = sitk.GetArrayFromImage(resampled).astype(np.float32, copy=False)
    if spec.contrast == "window":
        assert spec.window is not None
        center, width = spec.window
        array = np.clip((array - (center - width / 2.0)) / width, 0.0, 1.0, dtype=np.float32)
    elif spec.contrast != "none":
        raise ValueError(f"contrast {spec.contrast!r} is not supported for a 3d input")
    steps.append({"name": "contrast", "parameters": contrast_params(spec),
                  "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip
    return Preprocessed(resampled, np.ascontiguousarray(array), steps)


def network_volume(array_zyx: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The preprocessed volume in the network's axis order, as one (1, 1, ...) batch."""
    volume = array_zyx.transpose(2, 1, 0) if spec.layout == "columns_rows" else array_zyx
    return np.ascontiguousarray(volume[None, None], dtype=np.float32)


def from_network(output: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A (channels, ...) network output back in (channels, z, y, x) order."""
    return np.ascontiguousarray(output.transpose(0, 3, 2, 1) if spec.layout == "columns_rows"
                                else output)  # fmt: skip


def sliding_window(volume: np.ndarray, forward: Forward, inference: InferenceSpec) -> np.ndarray:
    """The network's output over the whole volume (1, 1, ...) -> (channels, ...), float32.

    Windows of `roi_size`, overlapping by `overlap`, `batch_size` at a time,
    blended with a Gaussian of `sigma_scale` times the window (or evenly):
    MONAI's own `sliding_window_inference`, imported only by 3D models.
    Windows and the blended output stay on the CPU; `forward` moves each
    batch to the runtime's device (a 300-slice output need not fit on a GPU).
    """
    from monai.inferers import sliding_window_inference

    assert inference.roi_size is not None

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(forward(windows.cpu().numpy()))

    with torch.inference_mode():
        out = sliding_window_inference(
            torch.from_numpy(volume), roi_size=inference.roi_size,
            sw_batch_size=inference.batch_size, predictor=predictor, overlap=inference.overlap,
            mode=inference.blend, sigma_scale=inference.sigma_scale, sw_device="cpu",
            device="cpu")  # fmt: skip
    assert isinstance(out, torch.Tensor)
    return np.asarray(out[0].float().numpy(), dtype=np.float32)
