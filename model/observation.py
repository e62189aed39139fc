"""What governance watches of each analysed series: its acquisition and its image statistics.

Recorded with every analysed run (`db/monitoring.py`) and compared week by
week with the model's baseline (`daemon/stages/monitor/`): a new scanner, a
new reconstruction kernel or a shifted noise level shows here before it shows
in the model's performance. Subgroups (sex, age band, manufacturer) come
from here too.

Nothing that identifies the patient is kept: no name, ID, UID or date. Age
is reduced to a band, as the ACR Assess-AI registry asks.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_io.series import LoadedSeries

# Age bands (lower bounds in years): the registry's paediatric / adult / elderly split.
AGE_BANDS: tuple[tuple[int, str], ...] = (
    (0, "0-17"),
    (18, "18-39"),
    (40, "40-59"),
    (60, "60-79"),
    (80, "80+"),
)
# Intensity percentiles of the analysed volume.
PERCENTILES = (1, 50, 99)
# A volume's statistics from an even sample of at most this many voxels (a
# 300 x 512² CT has 79 M): percentiles within a few hundredths of a percentile
# point, in milliseconds instead of the 0.1 s of a full pass on the analysis path.
MAX_VOXELS = 200_000
MAX_ROWS = 512  # rows whose neighbour differences give the noise


def observe(series: LoadedSeries) -> dict[str, object]:
    """The run's observation: header values, intensity percentiles and noise, sex and age band."""
    header = series.headers[0] if series.headers else Dataset()
    values = sitk.GetArrayViewFromImage(series.image)
    return {
        "modality": series.modality,
        "body_part": series.body_part,
        **acquisition(header),
        **intensity(np.asarray(values)),
        "patient_sex": _sex(header),
        "age_band": age_band(header),
    }


def acquisition(header: Dataset) -> dict[str, object]:
    """The scanner and protocol, from the header; None where a value is absent or unreadable."""
    spacing = _numbers(header, "PixelSpacing") or _numbers(header, "ImagerPixelSpacing")
    agent = _text(header, "ContrastBolusAgent")
    return {
        "manufacturer": _text(header, "Manufacturer"),
        "manufacturer_model": _text(header, "ManufacturerModelName"),
        "kernel": _text(header, "ConvolutionKernel"),
        "slice_thickness": _number(header, "SliceThickness"),
        "kvp": _number(header, "KVP"),
        "pixel_spacing": round(float(np.mean(spacing)), 4) if spacing else None,
        # Present in the header means contrast was given; absent, that nobody said so.
        "contrast": "yes" if agent else "no",
    }


def intensity(values: np.ndarray) -> dict[str, object]:
    """Percentiles of the volume in modality units, and its noise.

    Noise: the robust standard deviation (1.4826 x MAD) of differences
    between neighbouring pixels along a row, divided by sqrt(2). Anatomy
    changes slowly from pixel to pixel, so this follows the noise, not the
    content.
    """
    flat = values.reshape(-1)
    step = max(1, flat.size // MAX_VOXELS)
    sample = flat[::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        empty: dict[str, object] = {f"p{p:02d}": None for p in PERCENTILES}
        return empty | {"noise": None}
    out: dict[str, object] = {
        f"p{p:02d}": round(float(v), 3)
        for p, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES), strict=True)
    }
    rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values.reshape(1, -1)
    rows = rows[:: max(1, rows.shape[0] // MAX_ROWS)].astype(np.float64)
    diffs = np.diff(rows, axis=-1).reshape(-1)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size:
        mad = float(np.median(np.abs(diffs - np.median(diffs))))
        out["noise"] = round(float(1.4826 * mad / np.sqrt(2.0)), 4)
    else:
        out["noise"] = None
    return out


def age_band(header: Dataset) -> str | None:
    """The band of Patient's Age ("045Y"), else of the birth date at the study date."""
    years = _age_years(header)
    if years is None or years < 0 or years > 150:
        return None
    band = AGE_BANDS[0][1]
    for lower, name in AGE_BANDS:
        if years >= lower:
            band = name
    return band


def _age_years(header: Dataset) -> float | None:
    age = _text(header, "PatientAge")
    if age and len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        n = int(age[:3])
        return n / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[3]]
    birth = _date(header, "PatientBirthDate")
    when = _date(header, "StudyDate") or _date(header, "AcquisitionDate")
    if birth is None or when is None:
        return None
    return (when - birth).days / 365.25


def _sex(header: Dataset) -> str | None:
    sex = (_text(header, "PatientSex") or "").upper()
    return sex if sex in {"M", "F", "O"} else None


def _text(header: Dataset, keyword: str) -> str | None:
    try:
        value: Any = header.get(keyword)
    except Exception:  # a malformed element: as if absent
        return None
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()[:64]
    return text or None


def _number(header: Dataset, keyword: str) -> float | None:
    numbers = _numbers(header, keyword)
    return numbers[0] if numbers else None


def _numbers(header: Dataset, keyword: str) -> list[float]:
    try:
        value: Any = header.get(keyword)
        if value is None or value == "":
            return []
        items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        out = [round(float(v), 4) for v in items]
    except (TypeError, ValueError, OverflowError):
        return []
    return [v for v in out if np.isfinite(v)]


def _date(header: Dataset, keyword: str) -> date | None:
    text = _text(header, keyword)
    if not text or len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
