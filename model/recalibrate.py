"""`secondreader model calibrate`: Platt scaling fitted afresh for an existing model folder.

The fit is on the network's raw logits (`LoadedModel.logits`), never on the
probabilities the folder reports now, so a folder that is already calibrated
can be refitted: its old calibration plays no part in the new one. The
threshold is carried over through the logit it stands for, so that every
decision stays as it was; only what the probability means changes. The
weights are not touched (their SHA-256 stays); the manifest gets the
calibration, the converted threshold, a new version (the reported
probabilities differ, and governance keys on name and version), the test-set
metrics and, in `training`, what the calibration was fitted on.

Validation data: the synthetic validation set regenerated from the manifest's
`training` record (validation series for CT, validation images for
radiographs; seeded apart from the test set, so disjoint from it by
construction), or a site's labelled studies.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.calibration import fit_platt, logit
from model.datasets import (
    LabelledStudy,
    load_labelled_studies,
    split_studies,
    studies_to_slices,
    synthetic_split,
    synthetic_studies,
)
from model.manifest import Calibration, ModelManifest
from model.registry import MANIFEST_NAME, LoadedModel, load_model
from model.train import (
    HeldOutLogits,
    held_out_logits,
    measure,
    plot_roc,
    slice_logits,
    study_logits,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recalibration:
    folder: Path
    old: ModelManifest
    new: ModelManifest
    before: dict[str, float]  # test-set metrics with the old calibration and threshold
    after: dict[str, float]  # ... with the new ones
    test_set: str  # what the metrics were measured on
    test: HeldOutLogits  # its labels and raw logits


def raw_threshold(manifest: ModelManifest) -> float:
    """The manifest's threshold as a logit: through the inverse of its calibration."""
    z = logit(manifest.threshold)
    cal = manifest.calibration
    return z if cal is None else (z - cal.intercept) / cal.slope


def next_version(version: str) -> str:
    """1.0.0 -> 1.1.0: new probabilities, same network and decisions."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        raise ValueError(f"version {version!r} is not MAJOR.MINOR.PATCH: give the new one")
    return f"{m[1]}.{int(m[2]) + 1}.0"


def recalibrate(
    folder: Path,
    *,
    n_val_studies: int | None = None,
    seed: int | None = None,
    csv: Path | None = None,
    dicom_root: Path | None = None,
    version: str | None = None,
    device: str = "auto",
) -> Recalibration:
    """Fit, convert the threshold, measure before and after, rewrite the manifest."""
    folder = Path(folder)
    loaded = load_model(folder, device)
    old = loaded.manifest
    if not 0.0 < old.threshold < 1.0:
        raise ValueError(f"threshold {old.threshold} decides alone: nothing to carry over")
    version = next_version(old.version) if version is None else version
    if version == old.version:
        raise ValueError(f"version {version} is the current one: the probabilities change")
    if (csv is None) != (dicom_root is None):
        raise ValueError("csv and dicom_root go together")
    if csv is not None and dicom_root is not None:
        labels, logits, fitted_on, test, test_set, own = _site_data(
            loaded, csv, dicom_root, seed)
    else:
        if old.training.get("source", "synthetic") != "synthetic":
            raise ValueError(f"{folder} was trained on site data: give --csv and --dicom-root")
        labels, logits, fitted_on = _synthetic_validation(loaded, n_val_studies, seed)
        test, test_set, own = held_out_logits(loaded), "the manifest's synthetic test set", True
    calibration = fit_platt(logits, labels, fitted_on=fitted_on)
    # Exactly the decisions of before: p >= t_new  <=>  logit >= the old threshold's logit.
    z_threshold = raw_threshold(old)
    threshold = _sigmoid(calibration.slope * z_threshold + calibration.intercept)
    before = measure(test, old.calibration, old.threshold)
    after = measure(test, calibration, threshold)
    new = old.model_copy(update={
        "version": version,
        "threshold": threshold,
        "calibration": calibration,
        "metrics": _recorded(old.metrics, test, calibration, threshold, own),
        "training": {**old.training, "calibration_from": fitted_on,
                     "calibrated_by": "secondreader model calibrate",
                     "threshold_uncalibrated": round(_sigmoid(z_threshold), 6)},
    })
    new.write(folder / MANIFEST_NAME)
    if own:
        kind = str(old.training.get("kind", "ct"))
        plot_roc(test, calibration, threshold, "slice" if kind == "ct" else "image",
                 folder / "roc.png")
    log.info("recalibrated %s %s -> %s on %s: slope %.4f, intercept %.4f", old.name,
             old.version, version, fitted_on, calibration.slope, calibration.intercept)
    return Recalibration(folder, old, new, before, after, test_set, test)


def _sigmoid(z: float) -> float:
    # Unrounded: a rounded threshold could move a study lying within the rounding of it
    # to the other side.
    return float(1.0 / (1.0 + np.exp(-z)))


def _synthetic_validation(
    loaded: LoadedModel, n: int | None, seed: int | None
) -> tuple[np.ndarray, np.ndarray, str]:
    m = loaded.manifest
    kind = str(m.training.get("kind", "ct"))
    seed = int(m.training.get("seed", 0)) if seed is None else seed
    if kind == "ct":
        n = int(m.training.get("n_val_studies", 40)) if n is None else n
        labels, logits = study_logits(loaded, synthetic_studies(seed, "val", n, m.input))
        return labels, logits, f"{n} synthetic validation series (ct), seed {seed}"
    if kind == "cr":
        n = int(m.training.get("n_val", 400)) if n is None else n
        val = synthetic_split(seed, "val", n, m.input, "cr")
        what = f"{n} synthetic validation images (cr), seed {seed}"
        return val.y, slice_logits(loaded, val.x), what
    raise ValueError(f"{loaded.folder}: unknown synthetic data kind {kind!r}")


def _site_data(
    loaded: LoadedModel, csv: Path, dicom_root: Path, seed: int | None
) -> tuple[np.ndarray, np.ndarray, str, HeldOutLogits, str, bool]:
    """A site's labelled studies: fitted on some, measured on the others.

    A model trained on these studies keeps its own split (the calibration on
    its validation studies, the metrics on its test studies; its training
    studies would make it look surer than it is). Otherwise half the studies
    of each label fit, the other half measure.
    """
    m = loaded.manifest
    studies = load_labelled_studies(csv, dicom_root, m.input)
    own = m.training.get("source") == "csv"
    seed = int(m.training.get("seed", 0)) if seed is None else seed
    if own:
        split = split_studies(studies, seed)
        fit, held_out = split["val"], split["test"]
    else:
        split = split_studies(studies, seed, fractions=(0.5, 0.5))
        fit, held_out = split["val"] + split["train"], split["test"]
    labels, logits = study_logits(loaded, fit)
    test = _held_out(loaded, held_out)
    what = f"{len(fit)} labelled studies from {csv.name}, seed {seed}"
    return labels, logits, what, test, f"{len(held_out)} held-out studies of {csv.name}", own


def _held_out(loaded: LoadedModel, studies: list[LabelledStudy]) -> HeldOutLogits:
    return HeldOutLogits.of(loaded, studies_to_slices(studies), studies)


def _recorded(
    old: dict[str, float], test: HeldOutLogits, calibration: Calibration, threshold: float,
    own: bool,
) -> dict[str, float]:
    """The manifest's metrics: its own test set measured again, or, on another test set,
    the old ones (their calibration measures dropped: they describe the old calibration)
    beside the site's, prefixed `site_`."""
    if own:
        return measure(test, calibration, threshold, n_keys=("n_test", "n_test_studies"))
    kept = {k: v for k, v in old.items() if "ece" not in k and "brier" not in k}
    site = measure(test, calibration, threshold, n_keys=("n", "n_studies"))
    return kept | {f"site_{k}": v for k, v in site.items()}
