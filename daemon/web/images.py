"""The web page's pictures: an image of the analysed series with the AI's region, and the
model monitoring plot.

Rendered on the server as PNG (no viewer in the page): the modality's
window (dicom_io/summary.window), the finding's box in yellow on its key
image, and, when asked, the saliency map as a translucent overlay. Images
wider than `MAX_SIDE` are scaled down; `scale` says by how much, so that a
click on the picture maps back to the image's own pixels (a correction).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.pixels import read_modality_pixels
from dicom_io.summary import window

MAX_SIDE = 768
_BOX = (255, 220, 0)


@dataclass(frozen=True)
class SeriesImage:
    sop_instance_uid: str
    path: Path


def in_slice_order(images: list[SeriesImage]) -> list[SeriesImage]:
    """The series sorted along its normal (Instance Number without positions)."""
    keys = []
    for image in images:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(image.path, stop_before_pixels=True, specific_tags=[
                "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber"])  # fmt: skip
        keys.append(_position(ds))
    return [image for _, image in sorted(zip(keys, images, strict=True), key=lambda p: p[0])]


def _position(ds: Dataset) -> tuple[float, float]:
    number = float(ds.get("InstanceNumber") or 0)
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if position is None or orientation is None or len(orientation) != 6:
        return (number, number)
    normal = np.cross(*np.reshape(np.asarray(orientation, dtype=float), (2, 3)))
    return (float(np.dot(normal, np.asarray(position, dtype=float))), number)


def scale_of(rows: int, cols: int) -> float:
    return min(1.0, MAX_SIDE / max(rows, cols))


def render(
    path: Path,
    box: tuple[float, float, float, float] | None = None,
    saliency: np.ndarray | None = None,
) -> tuple[bytes, float]:
    """PNG of the image (first frame), with `box` (col0, row0, col1, row1) and the overlay."""
    header = dcmread(path, stop_before_pixels=True)
    pixels = read_modality_pixels(path)
    gray = window(pixels, header)
    rgb: np.ndarray = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if saliency is not None and saliency.shape == gray.shape and float(saliency.max()) > 0:
        heat = matplotlib.colormaps["inferno"](saliency / float(saliency.max()))[..., :3] * 255
        alpha = 0.45 * (saliency / float(saliency.max()))[..., None]
        rgb = rgb * (1 - alpha) + heat * alpha
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    scale = scale_of(*gray.shape)
    if scale < 1.0:
        size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    if box is not None:
        c0, r0, c1, r1 = (v * scale for v in box)
        ImageDraw.Draw(picture).rectangle((c0 - 1, r0 - 1, c1 + 1, r1 + 1), outline=_BOX, width=2)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue(), scale


def agreement_plot(rows: list[Any]) -> bytes:
    """PPV and agreement by ISO week, one line per model version (db/reviews.Agreement rows)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe

    figure = Figure(figsize=(8, 3.5), dpi=100)
    axes = figure.subplots(1, 2, sharey=True)
    weekly = [r for r in rows if r.period != "overall"]
    for model in sorted({r.model for r in weekly}):
        mine = sorted((r for r in weekly if r.model == model), key=lambda r: r.period)
        weeks = [r.period for r in mine]
        for ax, values in zip(axes, ([r.ppv for r in mine], [r.agreement for r in mine]),
                              strict=True):  # fmt: skip
            ax.plot(weeks, [v if v is not None else float("nan") for v in values], marker="o",
                    label=model)  # fmt: skip
    for ax, title in zip(axes, ("PPV (present findings upheld)", "Agreement"), strict=True):
        ax.set_title(title)
        ax.set_ylim(0, 1.05)
        ax.tick_params(axis="x", labelrotation=45)
    if weekly:
        axes[0].legend(fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()
