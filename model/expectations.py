"""The out-of-distribution gate: a series outside what a model was made for is not analysed.

A network gives a confident number for any input, a head CT or a sagittal
reformat included. The manifest's `[expects]` records what the model saw
in its training data: the acquisition plane, the field of view, the
intensity percentiles and the noise of each series (the same statistics the
drift watch records, `model.observation`). A series outside those ranges
gets the "AI not run, because..." SR (outcome failed_qc, the reason naming
the value and the range), never a probability.

`record` makes the ranges from the training studies' observations: their
minimum and maximum, widened on each side by `MARGIN` of the span, so that
the gate refuses what the model never saw rather than the tails of what it
did. A value the series does not have (no noise on a constant image, say)
is refused too: the model cannot be said to know it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from dicom_io.series import LoadedSeries
from model.manifest import MANIFEST_NAME, Expectations, ModelManifest, Range
from model.observation import intensity

# Widening of the recorded [min, max], as a fraction of its span on each side,
# and at least FLOOR of the variable's scale (the intensity range for the
# percentiles, the value itself otherwise): a value every training study
# shared (p01 = -1024 HU on CT, the air clipped) must not make a range of width 0.
MARGIN = 0.1
FLOOR = 0.02
Plane = Literal["axial", "coronal", "sagittal"]

# Variable -> what the reason calls it, and its unit (filled per modality).
_NAMES = {
    "field_of_view": "field of view",
    "p01": "1st intensity percentile",
    "p50": "median intensity",
    "p99": "99th intensity percentile",
    "noise": "noise",
}


def plane_of(series: LoadedSeries) -> Plane:
    """The plane the images lie in: the patient axis their normal is closest to (LPS)."""
    direction = np.asarray(series.image.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = np.abs(direction[:, 2])  # the third column: the slice direction
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def field_of_view(shape_yx: tuple[int, int], spacing_yx: tuple[float, float]) -> float:
    """The larger in-plane extent in mm: what a fit-the-field-of-view model scales to its input."""
    return round(float(max(shape_yx[0] * spacing_yx[0], shape_yx[1] * spacing_yx[1])), 2)


def statistics(series: LoadedSeries, observation: Mapping[str, object]) -> dict[str, object]:
    """The gated values of a series: its plane, field of view and intensity statistics."""
    size, spacing = series.image.GetSize(), series.image.GetSpacing()
    return {
        "plane": None if series.is_projection else plane_of(series),
        "field_of_view": field_of_view((size[1], size[0]), (spacing[1], spacing[0])),
        **{key: observation.get(key) for key in ("p01", "p50", "p99", "noise")},
    }


def statistics_of_volume(
    values: np.ndarray, spacing_yx: tuple[float, float], plane: Plane | None
) -> dict[str, object]:
    """`statistics` of a volume (z, y, x) or image (y, x) in modality units, as loaded."""
    shape = values.shape[-2:]
    return {
        "plane": plane,
        "field_of_view": field_of_view((shape[0], shape[1]), spacing_yx),
        **{k: v for k, v in intensity(values).items() if k in _NAMES},
    }


def check(
    expects: Expectations | None, values: Mapping[str, object], model: str, unit: str = ""
) -> str | None:
    """None when the series is within what the model expects, else the reason, in one line."""
    if expects is None:
        return None
    plane = values.get("plane")
    if expects.planes and plane is not None and plane not in expects.planes:
        return (f"the images are {plane}; {model} was made for "
                f"{' or '.join(expects.planes)} images")  # fmt: skip
    outside = []
    for key, name in _NAMES.items():
        allowed: Range | None = getattr(expects, key)
        if allowed is None:
            continue
        value = values.get(key)
        suffix = " mm" if key == "field_of_view" else unit
        if not isinstance(value, int | float) or not np.isfinite(value):
            outside.append(f"no {name} to compare")
        elif not allowed.low <= value <= allowed.high:
            outside.append(f"{name} {value:g}{suffix} (expected {allowed.low:g} to "
                           f"{allowed.high:g}{suffix})")  # fmt: skip
    if not outside:
        return None
    return (f"the series is outside what {model} was made for: {'; '.join(outside)} "
            f"(ranges recorded from {expects.recorded_from})")


def record(rows: Iterable[Mapping[str, object]], recorded_from: str) -> Expectations:
    """Ranges from the training studies' gated values (`statistics`), widened by MARGIN."""
    rows = list(rows)
    if len(rows) < 10:
        raise ValueError(f"{len(rows)} studies are too few to say what a model was made for")
    columns: dict[str, np.ndarray] = {}
    for key in _NAMES:
        values = np.asarray([r[key] for r in rows if isinstance(r.get(key), int | float)],
                            dtype=np.float64)  # fmt: skip
        if values.size == len(rows):  # a value some studies lack is not gated on
            columns[key] = values
    intensity_scale = 0.0
    if "p01" in columns and "p99" in columns:
        intensity_scale = float(columns["p99"].max() - columns["p01"].min())
    ranges: dict[str, Range] = {}
    for key, values in columns.items():
        low, high = float(values.min()), float(values.max())
        scale = intensity_scale if key in ("p01", "p50", "p99") else abs(float(values.mean()))
        pad = max(MARGIN * (high - low), FLOOR * scale)
        ranges[key] = Range(low=round(low - pad, 3), high=round(high + pad, 3))
    planes = sorted({str(r["plane"]) for r in rows if r.get("plane") is not None})
    return Expectations(planes=planes, recorded_from=recorded_from, **ranges)


def synthetic_rows(kind: str, seed: int, n: int) -> list[dict[str, object]]:
    """`statistics` of n studies from the synthetic training generator (half with a lesion)."""
    from model.datasets import SPLITS, sample_seed, synthetic_cr_image, synthetic_ct_volume

    rows = []
    for i in range(n):
        if kind == "ct":
            ss = np.random.SeedSequence(entropy=seed, spawn_key=(10 + SPLITS["train"], i))
            vol, spacing, _ = synthetic_ct_volume(ss, i % 2 == 0)
            rows.append(statistics_of_volume(vol, (spacing[1], spacing[2]), "axial"))
        elif kind == "cr":
            img, spacing_yx, _ = synthetic_cr_image(sample_seed(seed, "train", i), i % 2 == 0)
            rows.append(statistics_of_volume(img, spacing_yx, None))
        else:
            raise ValueError(f"unknown synthetic data kind {kind!r}")
    return rows


def site_rows(csv: Path, dicom_root: Path) -> list[dict[str, object]]:
    """`statistics` of a site's labelled studies (the CSV `model train --csv` takes)."""
    from dicom_io.series import load_series
    from model.datasets import find_study_series, read_label_csv
    from model.observation import observe

    found = find_study_series(dicom_root, set(read_label_csv(csv)))
    rows = []
    for paths in found.values():
        series = load_series(paths)
        rows.append(statistics(series, observe(series)))
    return rows


def write_expectations(folder: Path, expects: Expectations) -> ModelManifest:
    """Put `expects` into the folder's manifest (the weights, and their hash, untouched)."""
    path = Path(folder) / MANIFEST_NAME
    manifest = ModelManifest.from_file(path).model_copy(update={"expects": expects})
    manifest.write(path)
    return manifest
