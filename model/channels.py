"""Several series as the channels of one input: T1, T2 and FLAIR for one network.

`choose` finds, for each rule of `input.channel_series`, the series of the
study it names (by Series Description, Sequence Name, Scanning Sequence or
Image Type; the one with the most images where several match; never one
series for two channels). `stack` preprocesses the first, the reference,
as a single series is preprocessed, and resamples every other one onto the
reference's network grid through patient coordinates (SimpleITK, linear),
then denoises and scales it as its own: channel c of slice k is the other
series' signal at the very points of the reference's slice k.

Patient coordinates mean the same place only within one frame of reference:
series from two (a patient who moved between scans, another visit) are
refused, not silently mis-registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicom_io.series import LoadedSeries, SeriesFiles
from model.manifest import InputSpec, SeriesRule
from model.preprocess import Preprocessed, preprocess, process_resampled


def _values(header: Dataset, keyword: str) -> list[str]:
    value: Any = header.get(keyword)
    if value is None:
        return []
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    return [str(v).strip().upper() for v in items if str(v).strip()]


def matches(rule: SeriesRule, header: Dataset) -> bool:
    """Whether the series whose first image has `header` is the one `rule` names."""
    def like(keyword: str, patterns: list[str]) -> bool:
        text = " ".join(_values(header, keyword)).lower()
        return not patterns or any(fnmatchcase(text, p.lower()) for p in patterns)

    def has_all(keyword: str, wanted: list[str]) -> bool:
        present = set(_values(header, keyword))
        return all(w.strip().upper() in present for w in wanted)

    excluded = rule.not_series_description and like("SeriesDescription",
                                                    rule.not_series_description)
    return (not excluded
            and like("SeriesDescription", rule.series_description)
            and like("SequenceName", rule.sequence_name)
            and has_all("ScanningSequence", rule.scanning_sequence)
            and has_all("ImageType", rule.image_type))  # fmt: skip


def first_header(series: SeriesFiles | LoadedSeries) -> Dataset:
    if isinstance(series, LoadedSeries):
        return series.headers[0] if series.headers else Dataset()
    return pydicom.dcmread(Path(series.paths[0]), stop_before_pixels=True)


def choose(
    candidates: Sequence[SeriesFiles | LoadedSeries], rules: Sequence[SeriesRule]
) -> tuple[list[SeriesFiles | LoadedSeries], str | None]:
    """One series per rule, in the rules' order, or ([], the reason naming what is missing)."""
    headers = [first_header(s) for s in candidates]
    chosen: list[SeriesFiles | LoadedSeries] = []
    for rule in rules:
        fits = [s for s, h in zip(candidates, headers, strict=True)
                if matches(rule, h) and not any(s is c for c in chosen)]  # fmt: skip
        if not fits:
            return [], f"no {rule.name} series ({_describe(rule)})"
        chosen.append(max(fits, key=lambda s: s.n_slices))
    return chosen, None


def _describe(rule: SeriesRule) -> str:
    parts = []
    if rule.series_description:
        parts.append(f"Series Description like {' or '.join(rule.series_description)}")
    if rule.not_series_description:
        parts.append(f"not like {' or '.join(rule.not_series_description)}")
    if rule.sequence_name:
        parts.append(f"Sequence Name like {' or '.join(rule.sequence_name)}")
    if rule.scanning_sequence:
        parts.append(f"Scanning Sequence with {' and '.join(rule.scanning_sequence)}")
    if rule.image_type:
        parts.append(f"Image Type with {' and '.join(rule.image_type)}")
    return "; ".join(parts) or "any series"


def frame_of_reference_problem(series: Sequence[LoadedSeries], names: Sequence[str]) -> str | None:
    """None when all series share one Frame of Reference UID, else the reason."""
    uids = [str(s.headers[0].get("FrameOfReferenceUID", "") or "") if s.headers else ""
            for s in series]  # fmt: skip
    if all(uids) and len(set(uids)) == 1:
        return None
    missing = [n for n, u in zip(names, uids, strict=True) if not u]
    if missing:
        return f"the {', '.join(missing)} series state(s) no frame of reference"
    return (f"the {', '.join(names)} series are not in one frame of reference: "
            "registration between them is not done here")  # fmt: skip


def stack(reference: LoadedSeries, others: Sequence[LoadedSeries], spec: InputSpec) -> Preprocessed:
    """The reference preprocessed, with `channels` (n, c, h, w): every series on its grid."""
    pre = preprocess(reference, spec)
    planes = [pre.array]
    for series in others:
        resampled = sitk.Resample(series.image, pre.image, sitk.Transform(), sitk.sitkLinear,
                                  float("nan"), sitk.sitkFloat32)  # fmt: skip
        planes.append(process_resampled(resampled, series, spec))
    pre.channels = np.ascontiguousarray(np.stack(planes, axis=1), dtype=np.float32)
    pre.steps.append({
        "name": "channels",
        "parameters": {
            "series": [reference.series_instance_uid, *(s.series_instance_uid for s in others)],
            "onto": "the reference's network grid, linear, through patient coordinates",
        },
        "seconds": None,
    })
    return pre
