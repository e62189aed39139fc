"""From a loaded series and a model to an `AnalysisResult`: the infer stage's glue.

`analyse_series` preprocesses the series as the model's manifest asks, runs
the network on every slice, and turns slice outputs into study findings:

- study probability per label: the maximum over slices (a small nodule shows
  on one or two slices; a mean would dilute it);
- key slice: the slice with the highest probability for the label;
- location: the saliency peak of the key slice, mapped through physical
  space onto the source image it lies on (SOP instance, and frame for
  multi-frame sources), as a point and a box: the lesion found on that
  source image inside the saliency peak (model/region.py).

Points and boxes are DICOM SCOORD pixel coordinates, (column, row) with
(0, 0) the top left corner of the top left pixel: pixel (r, c) has its
centre at (c + 0.5, r + 0.5), and a box encloses whole pixels.

`analyse_study` picks, for each model, the series it applies to (the one
with the most slices) and turns a QC refusal into a FAILED_QC result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol, cast, runtime_checkable

import numpy as np
import SimpleITK as sitk

from dicom_io.series import (
    PROJECTION_MODALITIES,
    LoadedSeries,
    SeriesFiles,
    SeriesQCError,
    load_series,
)
from model import channels, expectations, projections
from model.detection import Detector, analyse_detections
from model.detection3d import Detector3D, analyse_detections_3d
from model.observation import observe
from model.preprocess import Preprocessed, preprocess
from model.region import locate_region
from model.results import (
    AlgorithmInfo,
    AnalysisResult,
    Finding,
    ImageLocation,
    Outcome,
)
from model.saliency_map import map_saliency, saliency_map
from model.segmentation import Segmenter, analyse_segmentation
from model.slicewise import SlicePlan, assemble, prepare_slices, series_plan, source_order
from model.stream import Applicable, Taken, model_key

log = logging.getLogger(__name__)

class PredictionLike(Protocol):
    @property
    def probabilities(self) -> np.ndarray: ...  # (n, n_labels)

    @property
    def saliency(self) -> np.ndarray | None: ...  # (n, h, w) in [0, 1]


class AnalysisModel(Applicable, Protocol):
    """What the analysis needs of a model; `model.registry.LoadedModel` is one."""

    def predict(self, slices: np.ndarray) -> PredictionLike: ...

    def algorithm_info(self) -> AlgorithmInfo: ...


@runtime_checkable
class SliceByModel(Protocol):
    """A model whose probabilities come apart from its saliency: analysed slice by slice."""

    def probabilities(self, slices: np.ndarray) -> np.ndarray: ...

    def predict(self, slices: np.ndarray, *, known: np.ndarray | None = None) -> PredictionLike: ...


def analyse_series(
    series: LoadedSeries,
    model: AnalysisModel,
    ahead: Taken | None = None,
    observation: dict[str, object] | None = None,
    others: Sequence[LoadedSeries] = (),
) -> AnalysisResult:
    """Preprocess, predict on all slices, and aggregate into one ANALYSED result.

    A 2D model whose input slices are source slices (`model.slicewise`) is
    run slice by slice, taking from `ahead` the slices prepared while the
    study arrived; any other, on the whole preprocessed series.
    """
    manifest = model.manifest
    if manifest.kind == "detection" and manifest.input.dims == "3d":
        return analyse_detections_3d(series, cast(Detector3D, model),
                                     observation if observation is not None else observe(series))
    if manifest.kind == "detection":
        return analyse_detections(series, cast(Detector, model),
                                  observation if observation is not None else observe(series))
    if manifest.kind == "segmentation":
        return analyse_segmentation(series, cast(Segmenter, model),
                                    observation if observation is not None else observe(series))
    plan = series_plan(series, manifest.input) if isinstance(model, SliceByModel) else None
    early = 0
    if plan is None:
        if manifest.input.channel_series:
            pre = channels.stack(series, others, manifest.input)
        else:
            pre = preprocess(series, manifest.input)
        started = time.perf_counter()
        prediction = model.predict(pre.network_input)
        inference_seconds = round(time.perf_counter() - started, 4)
    else:
        assert isinstance(model, SliceByModel)
        pre, prediction, early, inference_seconds = _slice_by_slice(series, model, plan, ahead)
    n = pre.array.shape[0]
    labels = manifest.labels
    probabilities = np.asarray(prediction.probabilities, dtype=np.float32)
    if probabilities.shape != (n, len(labels)):
        raise ValueError(
            f"model {manifest.name} gave probabilities of shape {probabilities.shape} "
            f"for {n} slices and {len(labels)} labels"
        )
    saliency = _checked_saliency(prediction.saliency, pre.array.shape, manifest.name)

    planes = map_saliency(saliency, pre, series)
    findings: list[Finding] = []
    for index, label in enumerate(labels):
        key = int(np.argmax(probabilities[:, index]))
        location = None
        if saliency is not None:
            location = _locate(saliency[key], key, pre, series, planes)
        findings.append(
            Finding(
                label=label.name,
                finding_type=label.finding.concept(),
                finding_site=label.site.concept(),
                probability=float(probabilities[key, index]),
                threshold=float(manifest.threshold),
                location=location,
            )
        )

    provenance: list[dict[str, object]] = [
        {
            "name": "load",
            "parameters": {"slices": series.n_slices, "warnings": list(series.warnings)},
            "seconds": None,  # timed by the caller, which read the files
        },
        *pre.steps,
        {
            "name": "inference",
            # The device it ran on (a protocol model may not say): CPU or GPU.
            "parameters": {
                "slices": n,
                "computed_while_receiving": early,
                "aggregation": "max over slices",
                "device": str(getattr(model, "device", "unknown")),
            },
            "seconds": inference_seconds,
        },
    ]
    log.info(
        "series %s analysed by %s %s: %s",
        series.series_instance_uid,
        manifest.name,
        manifest.version,
        ", ".join(f"{f.label}={f.probability:.3f}" for f in findings),
    )
    return AnalysisResult(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        outcome=Outcome.ANALYSED,
        algorithm=model.algorithm_info(),
        findings=findings,
        saliency=saliency_map(series, planes),
        provenance=provenance,
        observation=observation if observation is not None else observe(series),
    )


def _slice_by_slice(
    series: LoadedSeries, model: SliceByModel, plan: SlicePlan, ahead: Taken | None
) -> tuple[Preprocessed, PredictionLike, int, float]:
    """Network input and prediction, from the slices prepared ahead and the rest done now.

    Returns the preprocessed series, the prediction, how many slices were
    taken from `ahead`, and the seconds of inference spent here.
    """
    manifest = cast(AnalysisModel, model).manifest
    spec = manifest.input
    started = time.perf_counter()
    n = series.n_slices
    order = source_order(plan, n)
    rows, cols = spec.size
    x = np.empty((n, rows, cols), dtype=np.float32)
    probabilities = np.empty((n, len(manifest.labels)), dtype=np.float32)
    name = model_key(manifest)
    missing: list[int] = []
    for k, src in enumerate(order):
        frame = series.frame_numbers[src] if series.frame_numbers is not None else 1
        hit = ahead.slice(name, series.sop_instance_uids[src], frame, plan) if ahead else None
        if hit is None:
            missing.append(k)
        else:
            x[k], probabilities[k] = hit
    if len(missing) == n:
        # Nothing read ahead (streaming off, or the job came to another
        # worker): the whole series at once, as `preprocess` does it.
        pre = preprocess(series, spec)
        started = time.perf_counter()
        prediction = model.predict(pre.array)
        return pre, prediction, 0, round(time.perf_counter() - started, 4)
    values = sitk.GetArrayViewFromImage(series.image)
    network_index = {src: k for k, src in enumerate(order)}
    sources = sorted(order[k] for k in missing)
    # Runs of consecutive source slices: views of the volume, not copies of it.
    runs: list[np.ndarray] = []
    if sources:
        runs = np.split(np.asarray(sources), np.flatnonzero(np.diff(sources) > 1) + 1)
    for run in runs:
        first, stop = int(run[0]), int(run[-1]) + 1
        prepared = prepare_slices(values[first:stop], plan, spec)
        for offset, src in enumerate(range(first, stop)):
            x[network_index[src]] = prepared[offset]
    pre = assemble(series, spec, x, prepared_early=n - len(missing),
                   seconds=time.perf_counter() - started)  # fmt: skip
    started = time.perf_counter()
    if missing:
        probabilities[missing] = model.probabilities(x[missing])
    prediction = model.predict(x, known=probabilities)
    return pre, prediction, n - len(missing), round(time.perf_counter() - started, 4)


def _checked_saliency(
    saliency: np.ndarray | None, shape: tuple[int, ...], name: str
) -> np.ndarray | None:
    if saliency is None:
        return None
    values = np.asarray(saliency, dtype=np.float32)
    if values.shape != shape:
        raise ValueError(f"model {name} gave saliency of shape {values.shape}, expected {shape}")
    # In place (the array is the prediction's, used here only): a 300-slice
    # map is 20 MB, and two more of them cost page faults.
    np.nan_to_num(values, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(values, 0.0, 1.0, out=values)


def _locate(
    key_map: np.ndarray,
    key: int,
    pre: Preprocessed,
    series: LoadedSeries,
    planes: dict[int, np.ndarray],
) -> ImageLocation | None:
    """The key slice's saliency peak on its source image, with the region around it."""
    if float(key_map.max()) <= 0.0:
        return None
    row, col = np.unravel_index(int(np.argmax(key_map)), key_map.shape)
    point = pre.image.TransformContinuousIndexToPhysicalPoint((float(col), float(row), float(key)))
    index = series.image.TransformPhysicalPointToContinuousIndex(point)
    size = series.image.GetSize()
    k_src = int(np.clip(round(index[2]), 0, size[2] - 1))
    peak_rc = (
        int(np.clip(round(index[1]), 0, size[1] - 1)),
        int(np.clip(round(index[0]), 0, size[0] - 1)),
    )
    box: tuple[float, float, float, float] | None = None
    point = (peak_rc[1] + 0.5, peak_rc[0] + 0.5)
    plane = planes.get(k_src)
    if plane is not None and float(plane.max()) > 0.0:
        pixels = sitk.GetArrayViewFromImage(series.image)[k_src]
        region = locate_region(pixels, plane)
        point, box = region.point, region.box
    return ImageLocation(
        sop_instance_uid=series.sop_instance_uids[k_src],
        sop_class_uid=series.sop_class_uid,
        point=point,
        box=box,
        frame_number=series.frame_numbers[k_src] if series.frame_numbers is not None else None,
    )


def analyse_study(
    series_list: Sequence[SeriesFiles | LoadedSeries],
    models: Sequence[AnalysisModel],
    *,
    study_instance_uid: str | None = None,
    ahead: Taken | None = None,
) -> list[AnalysisResult]:
    """One result per model: ANALYSED, NOT_APPLICABLE or FAILED_QC (with the reason).

    Each model gets the applicable series with the most slices (the thinnest
    reconstruction, usually), loaded once however many models share it.
    """
    study_uid = study_instance_uid or next(
        (s.study_instance_uid for s in series_list if s.study_instance_uid), ""
    )
    loaded: dict[int, LoadedSeries | SeriesQCError] = {}
    load_seconds: dict[int, float] = {}
    results: list[AnalysisResult] = []
    for model in models:
        name = model.manifest.name
        if model.manifest.input.channel_series:
            results.append(_analyse_channels(study_uid, series_list, model, loaded, ahead))
            continue
        candidates: list[SeriesFiles | LoadedSeries] = []
        reasons: list[str] = []
        for s in series_list:
            reason = model.applicability(s.modality, s.body_part, s.series_description, s.n_slices)
            if reason is None:
                candidates.append(s)
            elif reason not in reasons:
                reasons.append(reason)
        if not candidates:
            why = "; ".join(reasons) if reasons else "the study holds no image series"
            log.info("study %s: %s does not apply (%s)", study_uid, name, why)
            results.append(
                AnalysisResult(
                    study_instance_uid=study_uid,
                    series_instance_uid=None,
                    outcome=Outcome.NOT_APPLICABLE,
                    algorithm=model.algorithm_info(),
                    reason=f"no series fits {name}: {why}",
                )
            )
            continue
        if all(_is_projection(c) for c in candidates):
            results.append(_analyse_projections(study_uid, candidates, model, loaded, ahead))
            continue
        chosen = max(candidates, key=lambda s: s.n_slices)
        try:
            started = time.perf_counter()
            series = _load(chosen, loaded, ahead)
            load_seconds.setdefault(id(chosen), round(time.perf_counter() - started, 4))
        except SeriesQCError as exc:
            log.warning(
                "study %s series %s failed QC for %s: %s",
                study_uid,
                chosen.series_instance_uid,
                name,
                exc.reason,
            )
            results.append(
                AnalysisResult(
                    study_instance_uid=study_uid,
                    series_instance_uid=chosen.series_instance_uid,
                    outcome=Outcome.FAILED_QC,
                    algorithm=model.algorithm_info(),
                    reason=exc.reason,
                )
            )
            continue
        result = _gated(study_uid, series, model, ahead)
        seconds = load_seconds.get(id(chosen))
        for step in result.provenance:
            if step.get("name") == "load" and step.get("seconds") is None:
                step["seconds"] = seconds  # read once, shared by the models that use it
        results.append(result)
    return _without_silent_models(study_uid, results)


def _gated(
    study_uid: str,
    series: LoadedSeries,
    model: AnalysisModel,
    ahead: Taken | None,
    others: Sequence[LoadedSeries] = (),
) -> AnalysisResult:
    """The series (with the `others` a multi-series model takes) analysed, or, outside
    what the model was made for, the reason it is not."""
    name = model.manifest.name
    observation = observe(series)
    unknown = expectations.check(
        model.manifest.expects,
        expectations.statistics(series, observation),
        name,
        " HU" if series.modality == "CT" else "",
    )
    if unknown is None:
        return analyse_series(series, model, ahead, observation, others)
    # A confident number on an input the model never saw is worse than none.
    log.warning("study %s series %s: %s not run: %s", study_uid,
                series.series_instance_uid, name, unknown)  # fmt: skip
    return AnalysisResult(
        study_instance_uid=study_uid,
        series_instance_uid=series.series_instance_uid,
        outcome=Outcome.FAILED_QC,
        algorithm=model.algorithm_info(),
        reason=unknown,
        observation=observation,
    )


def _is_projection(series: SeriesFiles | LoadedSeries) -> bool:
    return series.modality.upper() in PROJECTION_MODALITIES and series.n_slices == 1


def _analyse_projections(
    study_uid: str,
    images: Sequence[SeriesFiles | LoadedSeries],
    model: AnalysisModel,
    cache: dict[int, LoadedSeries | SeriesQCError],
    ahead: Taken | None,
) -> AnalysisResult:
    """Every image of a projection study, one finding per label and side (`model.projections`).

    An image that fails QC, or that the model was not made for, is left out
    and named in the provenance; the study is not run only if every image is.
    """
    analysed: list[tuple[LoadedSeries, AnalysisResult]] = []
    left_out: list[str] = []
    for image in images:
        try:
            series = _load(image, cache, ahead)
        except SeriesQCError as exc:
            left_out.append(exc.reason)
            continue
        result = _gated(study_uid, series, model, ahead)
        if result.outcome == Outcome.ANALYSED:
            analysed.append((series, result))
        else:
            left_out.append(f"{projections.view_name(series.headers[0])}: {result.reason}")
    if not analysed:
        return AnalysisResult(
            study_instance_uid=study_uid,
            series_instance_uid=images[0].series_instance_uid,
            outcome=Outcome.FAILED_QC,
            algorithm=model.algorithm_info(),
            reason="; ".join(dict.fromkeys(left_out)),
        )
    combined = projections.combine([s for s, _ in analysed], [r for _, r in analysed])
    if left_out:
        combined.provenance.append({"name": "images left out", "parameters": {
            "reasons": left_out}, "seconds": None})  # fmt: skip
    return combined


def _analyse_channels(
    study_uid: str,
    series_list: Sequence[SeriesFiles | LoadedSeries],
    model: AnalysisModel,
    cache: dict[int, LoadedSeries | SeriesQCError],
    ahead: Taken | None,
) -> AnalysisResult:
    """A model fed several series of the study, one per channel (`model.channels`)."""
    name = model.manifest.name
    rules = model.manifest.input.channel_series
    fitting = [s for s in series_list
               if model.applicability(s.modality, s.body_part, None, s.n_slices) is None]
    chosen, missing = channels.choose(fitting, rules)

    def not_run(outcome: Outcome, reason: str, series_uid: str | None = None) -> AnalysisResult:
        log.info("study %s: %s not run (%s)", study_uid, name, reason)
        return AnalysisResult(study_instance_uid=study_uid, series_instance_uid=series_uid,
                              outcome=outcome, algorithm=model.algorithm_info(), reason=reason)

    if missing is not None:
        return not_run(Outcome.NOT_APPLICABLE, f"{name} needs {missing}")
    try:
        series = [_load(s, cache, ahead) for s in chosen]
    except SeriesQCError as exc:
        return not_run(Outcome.FAILED_QC, exc.reason)
    problem = channels.frame_of_reference_problem(series, [r.name for r in rules])
    if problem is not None:
        return not_run(Outcome.FAILED_QC, problem, series[0].series_instance_uid)
    return _gated(study_uid, series[0], model, None, series[1:])


def _without_silent_models(study_uid: str, results: list[AnalysisResult]) -> list[AnalysisResult]:
    """Keep "not applicable" only when no model applies to the study at all.

    A CT study is not a reason for the radiograph model to report "AI did not
    run": one model that ran (or failed QC) speaks for the study. When none
    applies, one result says so, with every model's reason.
    """
    ran = [r for r in results if r.outcome != Outcome.NOT_APPLICABLE]
    if ran or not results:
        return ran
    if len(results) == 1:
        return results
    return [
        AnalysisResult(
            study_instance_uid=study_uid,
            series_instance_uid=None,
            outcome=Outcome.NOT_APPLICABLE,
            algorithm=None,
            reason="; ".join(r.reason or "" for r in results),
        )
    ]


def _load(
    chosen: SeriesFiles | LoadedSeries,
    cache: dict[int, LoadedSeries | SeriesQCError],
    ahead: Taken | None = None,
) -> LoadedSeries:
    """Load once per study, whether it succeeds or is refused, however many models ask."""
    if isinstance(chosen, LoadedSeries):
        return chosen
    if id(chosen) not in cache:
        try:
            cache[id(chosen)] = load_series(chosen.paths, ahead.images if ahead else None)
        except SeriesQCError as exc:
            cache[id(chosen)] = exc
    found = cache[id(chosen)]
    if isinstance(found, SeriesQCError):
        raise found
    return found
