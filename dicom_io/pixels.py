"""One image's pixels in modality units, for pictures we render (the summary image).

The analysis reads whole series through `dicom_io.series`; a rendered key
image needs only one file (or one frame of it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels import apply_modality_lut


def read_modality_pixels(path: Path, frame_number: int | None = None) -> np.ndarray:
    """(rows, cols) float32 in modality units (HU for CT); MONOCHROME1 inverted.

    `frame_number` is 1-based, for multi-frame images. Higher values are
    brighter in the result whatever the photometric interpretation, as in
    `dicom_io.series`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        index = (frame_number or 1) - 1
        if not 0 <= index < frames:
            raise ValueError(f"frame {frame_number} of an image with {frames} frame(s)")
        stored = ds.pixel_array if frames == 1 else ds.pixel_array[index]
        if stored.ndim != 2:
            raise ValueError(f"not a grayscale image (pixel array of shape {stored.shape})")
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = np.float32(float(values.min()) + float(values.max())) - values
    return values
