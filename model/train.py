"""`secondreader model train` / `evaluate`: make a model folder, and check one.

Recipe: a seeded train/validation/test split (synthetic phantoms, or a site's
labelled studies split by study), random affine and intensity augmentation,
Adam on binary cross-entropy with logits (one independent sigmoid output per
label, so a model can carry several labels), early stopping on validation
loss, Platt scaling fitted on the validation studies' maximum logit (so
that the study probability the daemon reports is calibrated), the decision
threshold set on the calibrated validation study probabilities (Youden's J),
and metrics (discrimination, and calibration: ECE and Brier score) measured
once on the untouched test sets through the same loading path the daemon uses
(`registry.load_model`).

Reproducible: the seed fixes data, initialisation, shuffling, augmentation
and dropout, and torch runs deterministic algorithms on <= 2 threads.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.calibration import brier_score, expected_calibration_error, fit_platt
from model.datasets import (
    Kind,
    LabelledStudy,
    SliceSet,
    Split,
    SyntheticStudy,
    load_labelled_studies,
    split_studies,
    studies_to_slices,
    synthetic_split,
    synthetic_studies,
)
from model.inference import calibrated
from model.intervals import wilson
from model.manifest import (
    AppliesTo,
    Calibration,
    Code,
    InputSpec,
    ModelManifest,
    OutputLabel,
    WeightsSpec,
)
from model.networks import SliceClassifier
from model.registry import (
    MANIFEST_NAME,
    LoadedModel,
    load_model,
    resolve_device,
    sha256_bytes,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "weights.pt"
# The built-in model's input: what the daemon's preprocessing produces for it.
CT_INPUT = InputSpec(
    orientation="LPS", size=(128, 128), spacing=None, slice_spacing=None,
    denoise="gaussian", denoise_sigma_mm=0.7, contrast="window", window=(-400.0, 1500.0),
    channels=1,
)
NODULE = OutputLabel(
    name="nodule",
    finding=Code(value="27925004", scheme="SCT", meaning="Nodule"),
    site=Code(value="39607008", scheme="SCT", meaning="Lung"),
)
# The built-in radiograph model: the same network, on a projection image.
# The window is not used ("histogram" contrast); it stays at its default only
# because TOML cannot say None.
CR_INPUT = InputSpec(
    orientation="LPS", size=(128, 128), spacing=None, slice_spacing=None,
    denoise="gaussian", denoise_sigma_mm=0.7, contrast="histogram", channels=1,
)
_DEMO = "Demonstration model trained on synthetic phantoms. Not for clinical use. "
# The calibration's limit, where a user reads the probability: `model calibrate` fits
# it on the generator's validation data, which says nothing of other data.
_CALIBRATED = (" Its probability is calibrated on synthetic validation data from the same "
               "generator; on real or otherwise shifted data it is not.")
DEMO_INTENDED_USE = {
    "ct": _DEMO + "Flags chest CT series showing a solid lung nodule of about 8-20 mm."
    + _CALIBRATED,
    "cr": _DEMO + "Flags frontal chest radiographs showing a lung nodule of about 10-30 mm."
    + _CALIBRATED,
}
# Per-kind training defaults (the built-in models were trained with these).
KIND_DEFAULTS: dict[str, dict[str, int]] = {
    "ct": {"epochs": 12, "min_epochs": 5, "n_test": 600},
    "cr": {"epochs": 16, "min_epochs": 12, "n_test": 400},
}
_APPLIES_TO = {
    # min_slices 5 keeps scouts and localizers (1-3 images) out.
    "ct": AppliesTo(modalities=["CT"], body_parts=["CHEST", "LUNG", "THORAX"], min_slices=5),
    "cr": AppliesTo(modalities=["CR", "DX"], body_parts=["CHEST", "LUNG", "THORAX"]),
}


@dataclass
class TrainReport:
    output_dir: Path
    metrics: dict[str, float]
    threshold: float
    epochs_run: int
    best_epoch: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


# --- Metrics (numpy only) ----------------------------------------------------------


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct score, "positive if score >= t"."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise ValueError("ROC needs both positive and negative cases")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each tie group
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / y.sum()]
    fpr = np.r_[0.0, fps / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids, so ties count one half)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity, midway between two scores."""
    fpr, tpr, thr = roc_curve(labels, scores)
    i = int(np.argmax(tpr - fpr))
    if i == 0:
        return float(min(1.0, thr[1] + 1e-6))
    below = thr[i + 1] if i + 1 < thr.size else 0.0
    return float(np.clip(0.5 * (thr[i] + below), 0.0, 1.0))


# --- Augmentation ------------------------------------------------------------------


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), zoom (0.9-1.1), shift (+-8 %), left-right flip; gain,
    offset and noise. Outside the image is 0, i.e. air in window contrast.

    No up-down flip: the spine is always posterior in an LPS axial slice.
    """
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    angle = u(-12.0, 12.0) * (np.pi / 180.0)
    scale = 1.0 / u(0.9, 1.1)  # theta maps output to input coordinates
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, u(-0.08, 0.08)], dim=1),
        torch.stack([sin * flip, cos, u(-0.08, 0.08)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = u(0.92, 1.08)[:, None, None, None]
    offset = u(-0.04, 0.04)[:, None, None, None]
    noise = u(0.0, 0.02)[:, None, None, None] * torch.randn(x.shape, generator=g)
    return (out * gain + offset + noise).clamp_(0.0, 1.0)


# --- Training ----------------------------------------------------------------------


def _loss_and_scores(
    net: torch.nn.Module, data: SliceSet, device: torch.device, batch_size: int
) -> tuple[float, np.ndarray]:
    net.eval()
    total, scores = 0.0, []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            xb = torch.from_numpy(data.x[start:start + batch_size]).to(device)
            yb = torch.from_numpy(data.y[start:start + batch_size]).to(device)[:, None]
            logits = net(xb)
            total += float(F.binary_cross_entropy_with_logits(logits, yb, reduction="sum"))
            scores.append(torch.sigmoid(logits)[:, 0].cpu().numpy())
    return total / max(len(data), 1), np.concatenate(scores) if scores else np.zeros(0)


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    return roc_auc(y, s) if 0 < y.sum() < y.size else float("nan")


def _synthetic_data(
    seed: int, n_train: int, n_val: int, n_test: int, spec: InputSpec, kind: Kind,
    progress: bool,
) -> dict[Split, SliceSet]:
    sizes: dict[Split, int] = {"train": n_train, "val": n_val, "test": n_test}
    with tqdm(total=sum(sizes.values()), desc=f"phantom images ({kind})", unit="image",
              disable=not progress) as bar:
        return {split: synthetic_split(seed, split, n, spec, kind, progress=bar.update)
                for split, n in sizes.items()}


def train(
    output_dir: Path,
    *,
    kind: Kind = "ct",
    seed: int = 0,
    n_train: int = 2400,
    epochs: int | None = None,
    csv: Path | None = None,
    dicom_root: Path | None = None,
    device: str = "auto",
    n_val: int = 400,
    n_test: int | None = None,
    n_val_studies: int = 40,
    n_test_studies: int = 40,
    batch_size: int = 32,
    lr: float = 2e-3,
    patience: int = 4,
    min_epochs: int | None = None,
    width: int = 12,
    name: str | None = None,
    version: str = "1.0.0",
    central_slices: int | None = None,
    threads: int = 2,
    progress: bool = True,
) -> TrainReport:
    """Train a slice classifier and write a complete model folder to `output_dir`.

    `kind` "ct" (axial chest CT) or "cr" (chest radiograph, CR/DX) picks the
    input spec, the applicability and the synthetic data; `epochs`,
    `min_epochs` and `n_test` default per kind (`KIND_DEFAULTS`): the faint
    radiograph nodules take the network longer to find. Without `csv`:
    synthetic phantoms, n_train/n_val/n_test images plus, for CT,
    n_val_studies/n_test_studies whole series. With `csv` (columns
    study_uid,label) and `dicom_root`: the site's studies, split by study
    70/15/15, every slice carrying its study's label.

    The threshold is set on validation *studies* (Youden's J on the maximum
    over slices, as the daemon scores a study): a slice threshold would flag
    most negative series, each of which offers dozens of chances for a false
    positive slice. Metrics: per slice (auc, sensitivity, specificity, n_test)
    and per study (study_auc, ..., n_test_studies). Writes manifest.toml,
    weights.pt, learning_curves.png and roc.png.
    """
    if (csv is None) != (dicom_root is None):
        raise ValueError("csv and dicom_root go together")
    t0 = time.monotonic()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if kind not in ("ct", "cr"):
        raise ValueError(f"unknown model kind {kind!r}")
    spec = CT_INPUT if kind == "ct" else CR_INPUT
    defaults = KIND_DEFAULTS[kind]
    epochs = defaults["epochs"] if epochs is None else epochs
    min_epochs = defaults["min_epochs"] if min_epochs is None else min_epochs
    n_test = defaults["n_test"] if n_test is None else n_test
    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(seed)
        val_studies: list[LabelledStudy] | list[SyntheticStudy]
        test_studies: list[LabelledStudy] | list[SyntheticStudy]
        if csv is not None and dicom_root is not None:
            studies = load_labelled_studies(csv, dicom_root, spec, central_slices=central_slices)
            by_split = split_studies(studies, seed)
            data = {k: studies_to_slices(v) for k, v in by_split.items()}
            if len(data["train"]) == 0:
                raise ValueError("no training studies after the split: label more studies")
            val_studies, test_studies = by_split["val"], by_split["test"]
            source = "csv"
        else:
            data = _synthetic_data(seed, n_train, n_val, n_test, spec, kind, progress)
            if kind == "ct":
                val_studies = _synthetic_study_set(seed, "val", n_val_studies, spec, progress)
                test_studies = _synthetic_study_set(seed, "test", n_test_studies, spec, progress)
            else:
                # A radiograph study is one image: the slice sets already are studies.
                val_studies, test_studies = [], []
            source = "synthetic"
        net = SliceClassifier(in_channels=spec.channels, n_labels=1, width=width, n_blocks=3,
                              lse_r=4.0).to(dev)
        history, best_state, best_epoch = _fit(net, data, dev, seed=seed, epochs=epochs,
                                               batch_size=batch_size, lr=lr, patience=patience,
                                               min_epochs=min_epochs, progress=progress)
        net.load_state_dict(best_state)
        calibration, threshold, threshold_from = _calibrate(
            net, dev, data["val"], val_studies, f"{source} {kind}, seed {seed}")
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)

    weights = output_dir / WEIGHTS_NAME
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
    training: dict[str, int | float | str | bool] = {
        "kind": kind, "source": source, "seed": seed, "n_train": len(data["train"]),
        "n_val": len(data["val"]), "n_test": len(data["test"]),
        "n_val_studies": len(val_studies), "n_test_studies": len(test_studies),
        "epochs_max": epochs, "epochs_run": len(history), "best_epoch": best_epoch,
        "batch_size": batch_size, "learning_rate": lr, "loss": "BCEWithLogits",
        "optimizer": "Adam", "threshold_from": threshold_from, "study_aggregation": "max",
        "calibration_from": calibration.fitted_on if calibration else "none (too few cases)",
        "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1),
    }
    manifest = _manifest(name, version, kind, source, csv, spec, threshold, weights, width,
                         training).model_copy(update={"calibration": calibration})
    manifest.write(output_dir / MANIFEST_NAME)

    # Test metrics through the daemon's own loading and inference path.
    loaded = load_model(output_dir, dev)
    test = HeldOutLogits.of(loaded, data["test"], test_studies)
    metrics = measure(test, calibration, threshold, n_keys=("n_test", "n_test_studies"))
    manifest = manifest.model_copy(update={"metrics": metrics})
    manifest.write(output_dir / MANIFEST_NAME)
    _plot_learning_curves(history, best_epoch, output_dir / "learning_curves.png")
    unit = "slice" if kind == "ct" else "image"
    plot_roc(test, calibration, threshold, unit, output_dir / "roc.png")
    seconds = time.monotonic() - t0
    log.info("trained %s in %.0f s: test AUC %.4f per slice, %s per study", manifest.name,
             seconds, metrics.get("auc", float("nan")), metrics.get("study_auc", float("nan")))
    return TrainReport(output_dir, metrics, threshold, len(history), best_epoch, seconds, history)


def _synthetic_study_set(
    seed: int, split: Split, n: int, spec: InputSpec, progress: bool
) -> list[SyntheticStudy]:
    with tqdm(total=n, desc=f"phantom series ({split})", unit="series",
              disable=not progress) as bar:
        return synthetic_studies(seed, split, n, spec, progress=bar.update)


def _net_logits(net: torch.nn.Module, x: np.ndarray, dev: torch.device) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], 64):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + 64])).to(dev)
            if xb.ndim == 3:
                xb = xb[:, None]
            out.append(net(xb)[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _calibrate(
    net: torch.nn.Module, dev: torch.device, val: SliceSet,
    val_studies: list[LabelledStudy] | list[SyntheticStudy], source: str,
) -> tuple[Calibration | None, float, str]:
    """Platt scaling on the validation studies' maximum logits (slices when there are no
    studies), then the threshold on the calibrated probabilities: (calibration, threshold,
    where from). Too few validation cases of a label: no calibration, plain sigmoid."""
    labels = np.array([s.label for s in val_studies], dtype=np.float32)
    if 0 < labels.sum() < labels.size:
        # A study's probability is the maximum over its slices; calibration is
        # monotonic, so it commutes with that maximum and is fitted on it.
        logits = np.array([_net_logits(net, s.slices, dev).max() for s in val_studies])
        unit = "validation studies"
    elif 0 < val.y.sum() < len(val):
        # No studies (radiographs: one image each), or too few to split: slices.
        labels, logits, unit = val.y, _net_logits(net, val.x, dev), "validation slices"
    else:
        return None, 0.5, "default"
    try:
        calibration: Calibration | None = fit_platt(
            logits, labels, fitted_on=f"{labels.size} {unit} ({source})")
    except ValueError as exc:
        log.warning("probabilities left uncalibrated: %s", exc)
        calibration = None
    return calibration, youden_threshold(labels, calibrated(logits, calibration)), unit


def _fit(
    net: torch.nn.Module, data: dict[Split, SliceSet], dev: torch.device, *, seed: int,
    epochs: int, batch_size: int, lr: float, patience: int, min_epochs: int, progress: bool,
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], int]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    train_x = torch.from_numpy(data["train"].x)
    train_y = torch.from_numpy(data["train"].y)
    history: list[dict[str, float]] = []
    best_loss, best_epoch, stale = float("inf"), 0, 0
    best_state = copy.deepcopy(net.state_dict())
    for epoch in range(1, epochs + 1):
        t_epoch = time.monotonic()
        net.train()
        order = torch.randperm(len(train_y), generator=g)
        total = 0.0
        # drop_last: a final batch of one would break BatchNorm's statistics.
        n_batches = max(len(order) // batch_size, 1)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{epochs}", unit="batch",
                   disable=not progress, leave=False)
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = augment(train_x[idx], g).to(dev)
            yb = train_y[idx].to(dev)[:, None]
            loss = F.binary_cross_entropy_with_logits(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        sched.step()
        val_loss, val_scores = _loss_and_scores(net, data["val"], dev, 64)
        row = {"epoch": float(epoch), "train_loss": total / max(n_batches * batch_size, 1),
               "val_loss": val_loss, "val_auc": _safe_auc(data["val"].y, val_scores),
               "seconds": time.monotonic() - t_epoch}
        history.append(row)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUC %.4f", epoch,
                 row["train_loss"], val_loss, row["val_auc"])
        if progress:
            tqdm.write(f"epoch {epoch}: train loss {row['train_loss']:.4f}  val loss "
                       f"{val_loss:.4f}  val AUC {row['val_auc']:.4f}  ({row['seconds']:.0f} s)")
        if val_loss < best_loss - 1e-4:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
            # Not before min_epochs: the loss can sit at chance level for a
            # few epochs before the network finds the lesions.
            if stale >= patience and epoch >= min_epochs:
                break
    return history, best_state, best_epoch


def _manifest(
    name: str | None, version: str, kind: Kind, source: str, csv: Path | None,
    spec: InputSpec, threshold: float, weights: Path, width: int,
    training: dict[str, int | float | str | bool],
) -> ModelManifest:
    what = "chest CT" if kind == "ct" else "chest radiographs"
    if source == "synthetic":
        name = name or f"secondreader-demo-nodule-{kind}"
        description = f"2D CNN classifier for lung nodules in {what}, trained on synthetic data."
        intended_use = DEMO_INTENDED_USE[kind]
    else:
        name = name or f"site-nodule-{kind}"
        source_name = csv.name if csv else "site data"
        description = f"2D CNN classifier for lung nodules in {what}, trained on {source_name}."
        intended_use = ("Trained on a site's own labelled studies. Validate locally before any "
                        "use; not a cleared medical device. Its probability is calibrated on "
                        "the site's validation studies; on other data it is not.")
    return ModelManifest(
        name=name,
        version=version,
        manufacturer="secondreader",
        description=description,
        intended_use=intended_use,
        applies_to=_APPLIES_TO[kind],
        input=spec,
        labels=[NODULE],
        threshold=round(threshold, 6),
        weights=WeightsSpec(
            file=weights.name,
            sha256=sha256_bytes(weights.read_bytes()),
            format="state_dict",
            architecture="model.networks:SliceClassifier",
            arguments={"in_channels": spec.channels, "n_labels": 1, "width": width,
                       "n_blocks": 3, "lse_r": 4.0},
        ),
        training=training,
    )


# --- Evaluation --------------------------------------------------------------------


def slice_logits(loaded: LoadedModel, x: np.ndarray) -> np.ndarray:
    """The first label's raw logit per slice, through the daemon's runtime."""
    if x.shape[0] == 0:
        return np.zeros(0, np.float32)
    return loaded.logits(x, batch_size=64)[:, 0]


def study_logits(
    loaded: LoadedModel, studies: list[LabelledStudy] | list[SyntheticStudy]
) -> tuple[np.ndarray, np.ndarray]:
    """Study labels and logits: the maximum over each study's slices.

    The daemon's study probability is the maximum of the slice probabilities;
    a calibration is increasing, so it is the calibrated maximum logit.
    """
    labels = np.asarray([float(s.label) for s in studies], np.float32)
    logits = np.asarray([slice_logits(loaded, s.slices).max() for s in studies], np.float64)
    return labels, logits


@dataclass(frozen=True)
class HeldOutLogits:
    """A test set's labels and raw logits, per slice and per study (no studies: empty)."""

    slice_labels: np.ndarray
    slice_logits: np.ndarray
    study_labels: np.ndarray
    study_logits: np.ndarray

    @classmethod
    def of(
        cls, loaded: LoadedModel, slices: SliceSet,
        studies: list[LabelledStudy] | list[SyntheticStudy],
    ) -> HeldOutLogits:
        return cls(slices.y, slice_logits(loaded, slices.x), *study_logits(loaded, studies))


def held_out_logits(
    loaded: LoadedModel,
    *,
    seed: int | None = None,
    n_test: int | None = None,
    n_test_studies: int | None = None,
    studies: bool = True,
    csv: Path | None = None,
    dicom_root: Path | None = None,
) -> HeldOutLogits:
    """The test set of `evaluate`, through the model: see there."""
    m = loaded.manifest
    if csv is not None and dicom_root is not None:
        labelled = load_labelled_studies(csv, dicom_root, m.input)
        return HeldOutLogits.of(loaded, studies_to_slices(labelled), labelled if studies else [])
    if csv is not None or dicom_root is not None:
        raise ValueError("csv and dicom_root go together")
    kind = str(m.training.get("kind", "ct"))
    if kind not in ("ct", "cr"):
        raise ValueError(f"{loaded.folder}: unknown synthetic data kind {kind!r}")
    seed = int(m.training.get("seed", 0)) if seed is None else seed
    n_test = int(m.training.get("n_test", 600)) if n_test is None else n_test
    if n_test_studies is None:
        n_test_studies = int(m.training.get("n_test_studies", 40))
    test = synthetic_split(seed, "test", n_test, m.input, "ct" if kind == "ct" else "cr")
    # Radiographs: one image per study, so no separate study set.
    with_series = studies and kind == "ct"
    series = synthetic_studies(seed, "test", n_test_studies, m.input) if with_series else []
    return HeldOutLogits.of(loaded, test, series)


def _metrics(
    labels: np.ndarray, logits: np.ndarray, calibration: Calibration | None, threshold: float,
    *, prefix: str, n_key: str,
) -> dict[str, float]:
    """Rounded metrics for a manifest; AUC left out when one label is missing (undefined).

    Discrimination at the threshold, and calibration: ECE and Brier score of
    the reported probabilities, and, for a calibrated model, of the plain
    sigmoid too (`*_uncalibrated`), so that the gain shows.
    """
    y = np.asarray(labels, dtype=bool)
    if y.size == 0:
        return {}
    scores = calibrated(logits, calibration)
    pred = scores >= threshold
    # With their 95 % Wilson intervals: 19/20 is 0.95, and 0.76 to 0.99 is what it says.
    found, cleared = wilson(int((pred & y).sum()), int(y.sum())), wilson(
        int((~pred & ~y).sum()), int((~y).sum()))
    out = {
        f"{prefix}sensitivity": float((pred & y).sum() / max(int(y.sum()), 1)),
        f"{prefix}specificity": float((~pred & ~y).sum() / max(int((~y).sum()), 1)),
        **{f"{prefix}{name}_{end}": float(value)
           for name, interval in (("sensitivity", found), ("specificity", cleared))
           for end, value in (("low", interval.low), ("high", interval.high))
           if value is not None},
        n_key: float(y.size),
        f"{n_key}_positive": float(y.sum()),
        f"{prefix}ece": expected_calibration_error(y, scores),
        f"{prefix}brier": brier_score(y, scores),
    }
    if calibration is not None:
        plain = calibrated(logits, None)
        out[f"{prefix}ece_uncalibrated"] = expected_calibration_error(y, plain)
        out[f"{prefix}brier_uncalibrated"] = brier_score(y, plain)
    if 0 < y.sum() < y.size:
        out[f"{prefix}auc"] = roc_auc(y, scores)
    return {k: round(v, 6) for k, v in sorted(out.items())}


def measure(
    test: HeldOutLogits, calibration: Calibration | None, threshold: float,
    *, n_keys: tuple[str, str] = ("n", "n_studies"),
) -> dict[str, float]:
    """Per-slice and (where there are studies) per-study metrics of a test set."""
    out = _metrics(test.slice_labels, test.slice_logits, calibration, threshold, prefix="",
                   n_key=n_keys[0])
    out |= _metrics(test.study_labels, test.study_logits, calibration, threshold,
                    prefix="study_", n_key=n_keys[1])
    return out


def evaluate(
    model_dir: Path,
    *,
    seed: int | None = None,
    n_test: int | None = None,
    n_test_studies: int | None = None,
    studies: bool = True,
    csv: Path | None = None,
    dicom_root: Path | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Measure a model folder at its manifest threshold, with its calibration.

    Returns auc, sensitivity, specificity, ece, brier, n, n_positive per slice
    and, with `studies`, study_auc, study_sensitivity, study_specificity,
    study_ece, study_brier, n_studies, n_studies_positive per study (maximum
    over slices); a calibrated model adds the plain sigmoid's ece and brier
    (`*_uncalibrated`). Without `csv`: the synthetic test sets, by default
    those recorded in the manifest (training seed, n_test, n_test_studies), so
    the recorded metrics can be reproduced. With `csv` and `dicom_root`: every
    listed study (slices carry their study's label).
    """
    loaded = load_model(Path(model_dir), device)
    m = loaded.manifest
    test = held_out_logits(loaded, seed=seed, n_test=n_test, n_test_studies=n_test_studies,
                       studies=studies, csv=csv, dicom_root=dicom_root)
    out = measure(test, m.calibration, m.threshold)
    log.info("evaluated %s: %s", m.name, out)
    return out


# --- Plots -------------------------------------------------------------------------


def _plot_learning_curves(history: list[dict[str, float]], best_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="training")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.axvline(best_epoch, color="grey", ls="--", label=f"kept (epoch {best_epoch})")
    ax_loss.set(xlabel="epoch", ylabel="binary cross-entropy", title="Loss")
    ax_loss.legend()
    ax_auc.plot(epochs, [h["val_auc"] for h in history], "o-", color="C2")
    ax_auc.set(xlabel="epoch", ylabel="AUC", title="Validation AUC", ylim=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(
    test: HeldOutLogits, calibration: Calibration | None, threshold: float, unit: str, path: Path
) -> None:
    curves = [(unit, test.slice_labels, test.slice_logits),
              ("study", test.study_labels, test.study_logits)]
    _plot_roc([(u, y, calibrated(z, calibration)) for u, y, z in curves], threshold, path)


def _plot_roc(
    curves: list[tuple[str, np.ndarray, np.ndarray]], threshold: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for i, (unit, labels, scores) in enumerate(curves):
        y = np.asarray(labels, dtype=bool)
        if not 0 < y.sum() < y.size:
            continue  # ROC undefined with one label only
        fpr, tpr, _ = roc_curve(y, scores)
        pred = np.asarray(scores) >= threshold
        sens = (pred & y).sum() / y.sum()
        spec = (~pred & ~y).sum() / (~y).sum()
        ax.plot(fpr, tpr, color=f"C{i}",
                label=f"per {unit}: AUC {roc_auc(y, scores):.3f} (n={y.size})")
        ax.plot(1 - spec, sens, "o", color=f"C{i}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Test ROC (dots: threshold {threshold:.3f})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
