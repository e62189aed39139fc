"""Training and test data: the network-input transform, synthetic splits, labelled DICOM.

The transform (`network_input`) is the contract with the daemon's
preprocessing: a model sees in production what it saw in training only if
both do the same arithmetic. Per axial slice, in this order:

1. resample in-plane (linear) onto `spec.size`: the whole field of view when
   `spec.spacing` is None (each axis scaled on its own), else `spec.spacing`
   mm pixels about the image centre; outside the image is air (the minimum);
2. denoise: recursive Gaussian of `spec.denoise_sigma_mm` mm, or CurvatureFlow;
3. contrast: window (center, width) in HU mapped linearly to [0, 1] and
   clipped; or "histogram": the 1st..99th percentile of the slice mapped to
   [0, 1] and clipped.

Splits of synthetic data are seeded per sample (SeedSequence(seed, split,
index)), so a test set is the same whatever n_train was, and never overlaps
the training set.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from model.manifest import InputSpec
from model.phantom import phantom_radiograph, phantom_slice, phantom_volume

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "val": 1, "test": 2}
Split = Literal["train", "val", "test"]
Kind = Literal["ct", "cr"]  # synthetic data: axial chest CT, or chest radiograph


def network_input(hu: np.ndarray, spacing_yx: tuple[float, float], spec: InputSpec) -> np.ndarray:
    """One slice (rows, cols) in HU (or raw values) -> (h, w) float32 network input."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))
    img.SetSpacing((float(spacing_yx[1]), float(spacing_yx[0])))
    rows, cols = hu.shape
    out_rows, out_cols = spec.size
    if spec.spacing is None:
        out_spacing = (cols * spacing_yx[1] / out_cols, rows * spacing_yx[0] / out_rows)
    else:
        out_spacing = (float(spec.spacing[1]), float(spec.spacing[0]))
    # Centre on centre: pixel centres of both grids share the image's midpoint.
    in_mid = ((cols - 1) * spacing_yx[1] / 2.0, (rows - 1) * spacing_yx[0] / 2.0)
    origin = (in_mid[0] - (out_cols - 1) * out_spacing[0] / 2.0,
              in_mid[1] - (out_rows - 1) * out_spacing[1] / 2.0)
    img = sitk.Resample(img, (out_cols, out_rows), sitk.Transform(), sitk.sitkLinear, origin,
                        out_spacing, (1.0, 0.0, 0.0, 1.0), float(hu.min()), sitk.sitkFloat32)
    if spec.denoise == "gaussian":
        img = sitk.SmoothingRecursiveGaussian(img, spec.denoise_sigma_mm)
    elif spec.denoise == "curvature_flow":
        # Stable time step is below min spacing / 2^(dim + 1) (ITK): 2D here.
        step = min(out_spacing) / 8.0
        img = sitk.CurvatureFlow(img, timeStep=step, numberOfIterations=spec.denoise_iterations)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if spec.contrast == "zscore":
        # Unclipped, unlike the rest: only imported MONAI bundles use it, none trained here.
        raise ValueError("contrast 'zscore' is for imported MONAI bundles, not for training here")
    if spec.contrast == "window":
        if spec.window is None:
            raise ValueError("contrast 'window' needs input.window")
        center, width = spec.window
        arr = (arr - (center - width / 2.0)) / width
    elif spec.contrast == "histogram":
        lo, hi = np.percentile(arr, [1.0, 99.0])
        arr = (arr - lo) / max(float(hi - lo), 1e-6)
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def network_input_stack(
    volume: np.ndarray, spacing_yx: tuple[float, float], spec: InputSpec
) -> np.ndarray:
    """(z, rows, cols) -> (z, h, w): `network_input` on each slice."""
    return np.stack([network_input(s, spacing_yx, spec) for s in volume]).astype(np.float32)


def to_network_pixel(
    yx: tuple[int, int], shape: tuple[int, int], spec: InputSpec
) -> tuple[float, float]:
    """A source pixel (row, col) in network-input pixels, for a fit-the-FOV resample."""
    row, col = ((p + 0.5) * o / s - 0.5 for p, s, o in zip(yx, shape, spec.size, strict=True))
    return (row, col)


@dataclass
class SliceSet:
    """Slices ready for the network, with labels and (for synthetic data) lesion centres."""

    x: np.ndarray  # (n, 1, h, w) float32
    y: np.ndarray  # (n,) float32, 1 = lesion
    centers: np.ndarray  # (n, 2) float32, lesion centre in network pixels; -1 when none
    groups: np.ndarray  # (n,) int, which study a slice came from

    def __len__(self) -> int:
        return int(self.y.shape[0])


def sample_seed(seed: int, split: Split, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=seed, spawn_key=(SPLITS[split], index))


def synthetic_ct_sample(
    ss: np.random.SeedSequence, lesion: bool, spec: InputSpec
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One synthetic CT training sample: (h, w) network input, lesion centre or None.

    The reconstruction matrix (256, 384 or 512) and field of view (330-420 mm)
    vary: the resample to 128x128 is linear without anti-aliasing, as in
    production, so a thin vessel looks different from each matrix (from 512
    it can be caught on one sample point as a bright dot). Training on one
    matrix only made the model fire on such dots in 512x512 series.
    """
    rng = np.random.default_rng(ss)
    fov = rng.uniform(330.0, 420.0)
    matrix = int(rng.choice([256, 384, 512]))
    spacing = (fov / matrix, fov / matrix)
    hu, center = phantom_slice(rng, matrix, matrix, spacing, lesion=lesion)
    x = network_input(hu, spacing, spec)
    c = to_network_pixel(center, hu.shape, spec) if center is not None else None
    return x, c


def synthetic_cr_sample(
    ss: np.random.SeedSequence, lesion: bool, spec: InputSpec
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One synthetic chest radiograph: (h, w) network input, lesion centre or None.

    Drawn at 256 rows over a 350-430 mm detector, 80-100 % as wide as high
    (detectors are often portrait), so the fit-the-field-of-view resample
    stretches some images more than others, as it will in production.
    """
    img, spacing, center = synthetic_cr_image(ss, lesion)
    x = network_input(img.astype(np.float32), spacing, spec)
    c = to_network_pixel(center, img.shape, spec) if center is not None else None
    return x, c


_SAMPLERS = {"ct": synthetic_ct_sample, "cr": synthetic_cr_sample}


def synthetic_split(
    seed: int, split: Split, n: int, spec: InputSpec, kind: Kind = "ct",
    progress: Callable[[int], None] | None = None,
) -> SliceSet:
    """n synthetic slices, half with a nodule (even indices), deterministic from the seed."""
    if kind not in _SAMPLERS:
        raise ValueError(f"unknown synthetic data kind {kind!r}")
    sample = _SAMPLERS[kind]
    h, w = spec.size
    x = np.empty((n, 1, h, w), dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    centers = np.full((n, 2), -1.0, dtype=np.float32)
    for i in range(n):
        lesion = i % 2 == 0
        x[i, 0], c = sample(sample_seed(seed, split, i), lesion, spec)
        y[i] = float(lesion)
        if c is not None:
            centers[i] = c
        if progress is not None:
            progress(1)
    return SliceSet(x, y, centers, np.arange(n))


@dataclass
class SyntheticStudy:
    slices: np.ndarray  # (n, h, w) float32 network input
    label: int
    lesion_slice: int | None  # slice index of the nodule centre


def synthetic_ct_study(ss: np.random.SeedSequence, lesion: bool, spec: InputSpec,
                       n_slices: int = 24) -> SyntheticStudy:
    """A whole synthetic series through the lungs, preprocessed slice by slice.

    Slice spacing 2, 3 or 5 mm and the same matrices as the training slices:
    a study-level check of what the daemon does, the maximum over slices.
    """
    vol, spacing, center = synthetic_ct_volume(ss, lesion, n_slices)
    x = network_input_stack(vol, (spacing[1], spacing[2]), spec)
    return SyntheticStudy(x, int(lesion), center[0] if center is not None else None)


def synthetic_ct_volume(
    ss: np.random.SeedSequence, lesion: bool, n_slices: int = 24
) -> tuple[np.ndarray, tuple[float, float, float], tuple[int, int, int] | None]:
    """The HU volume (z, y, x) of `synthetic_ct_study`, its spacing (z, y, x) and nodule centre."""
    rng = np.random.default_rng(ss)
    fov = rng.uniform(330.0, 420.0)
    matrix = int(rng.choice([256, 384, 512]))
    sz = float(rng.choice([2.0, 3.0, 5.0]))
    spacing = (sz, fov / matrix, fov / matrix)
    vol, center = phantom_volume(rng, n_slices, matrix, matrix, spacing, lesion=lesion)
    return vol, spacing, center


def synthetic_cr_image(
    ss: np.random.SeedSequence, lesion: bool
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int] | None]:
    """The stored radiograph (y, x) of `synthetic_cr_sample`, its pixel spacing, lesion centre."""
    rng = np.random.default_rng(ss)
    fov = rng.uniform(350.0, 430.0)
    rows = 256
    cols = int(round(rows * rng.uniform(0.8, 1.0)))
    spacing = (fov / rows, fov / rows)
    img, center = phantom_radiograph(rng, rows, cols, spacing, lesion=lesion)
    return img, spacing, center


def synthetic_studies(
    seed: int, split: Split, n: int, spec: InputSpec,
    progress: Callable[[int], None] | None = None,
) -> list[SyntheticStudy]:
    """n synthetic series, half with a nodule (even indices); seeded apart from the slices."""
    out = []
    for i in range(n):
        ss = np.random.SeedSequence(entropy=seed, spawn_key=(10 + SPLITS[split], i))
        out.append(synthetic_ct_study(ss, i % 2 == 0, spec))
        if progress is not None:
            progress(1)
    return out


# --- A site's own labelled studies -------------------------------------------------


_TRUE = {"1", "true", "yes", "positive", "pos"}
_FALSE = {"0", "false", "no", "negative", "neg"}
_NON_IMAGE_MODALITIES = {"SR", "SEG", "PR", "KO", "REG", "RTSTRUCT", "DOC"}


def read_label_csv(path: Path) -> dict[str, int]:
    """CSV with a header and columns study_uid,label (label 0/1, or true/false ...)."""
    labels: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"study_uid", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            uid = (row["study_uid"] or "").strip()
            value = (row["label"] or "").strip().lower()
            if not uid:
                raise ValueError(f"{path}:{line}: empty study_uid")
            if value in _TRUE:
                label = 1
            elif value in _FALSE:
                label = 0
            else:
                raise ValueError(f"{path}:{line}: label {row['label']!r} is not 0/1")
            if labels.get(uid, label) != label:
                raise ValueError(f"{path}:{line}: study listed twice with different labels")
            labels[uid] = label
    return labels


def _slice_position(ds: pydicom.Dataset) -> float:
    """Position along the slice normal, for ordering; instance number as a fallback."""
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.asarray(ipp, float) @ normal)
    return float(ds.get("InstanceNumber", 0) or 0)


def find_study_series(root: Path, study_uids: set[str]) -> dict[str, list[Path]]:
    """For each wanted study under root, the files of its largest image series, in slice order."""
    tags = ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImagePositionPatient",
            "ImageOrientationPatient", "InstanceNumber"]
    found: dict[str, dict[str, list[tuple[float, Path]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError):
            continue
        study = str(ds.get("StudyInstanceUID", ""))
        if study not in study_uids or str(ds.get("Modality", "")) in _NON_IMAGE_MODALITIES:
            continue
        found[study][str(ds.get("SeriesInstanceUID", ""))].append((_slice_position(ds), path))
    out: dict[str, list[Path]] = {}
    for study, series in found.items():
        largest = max(series.values(), key=len)
        out[study] = [p for _, p in sorted(largest, key=lambda t: (t[0], str(t[1])))]
    return out


def read_series(
    paths: list[Path], orientation: str = "LPS"
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Files of one series -> (z, rows, cols) float32 in modality units, spacing (z, y, x) mm.

    Volumes are reoriented to `orientation`; a single image (a radiograph)
    is not, as it has no patient axes to reorient. GDCM already inverts
    MONOCHROME1 images, so brighter means more attenuation for both.
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    # Float output: with the first file's integer type, a later slice's rescale would truncate.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    img = reader.Execute()
    if img.GetDimension() == 3 and img.GetSize()[2] > 1:
        img = sitk.DICOMOrient(img, orientation)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    sp = img.GetSpacing()
    spacing = (sp[2] if len(sp) > 2 else 1.0, sp[1], sp[0])
    if arr.shape[0] == 1:
        # GDCM leaves a radiograph's spacing at 1 mm when it is given only as
        # Imager Pixel Spacing (or, for CR, even as Pixel Spacing): read it here.
        header = pydicom.dcmread(paths[0], stop_before_pixels=True,
                                 specific_tags=["PixelSpacing", "ImagerPixelSpacing"])
        given = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
        if given is not None and len(given) == 2:
            spacing = (1.0, float(given[0]), float(given[1]))
    return arr, spacing


@dataclass
class LabelledStudy:
    study_uid: str
    label: int
    slices: np.ndarray  # (n, h, w) float32 network input


def load_labelled_studies(
    csv_path: Path, dicom_root: Path, spec: InputSpec, *, central_slices: int | None = None
) -> list[LabelledStudy]:
    """Each labelled study's largest series, preprocessed by `network_input`.

    Every slice gets its study's label (weak labels): a positive study's
    slices away from the finding are labelled positive too. `central_slices`
    keeps only the middle n slices, which helps when findings sit mid-series.
    """
    labels = read_label_csv(csv_path)
    series = find_study_series(dicom_root, set(labels))
    missing = sorted(set(labels) - set(series))
    if missing:
        # Study UIDs only at DEBUG: they identify a patient's examination.
        log.warning("%d labelled studies have no images under %s", len(missing), dicom_root)
        log.debug("studies without images: %s", missing)
    studies: list[LabelledStudy] = []
    for uid in sorted(series):
        vol, spacing = read_series(series[uid], spec.orientation)
        if central_slices is not None and vol.shape[0] > central_slices:
            start = (vol.shape[0] - central_slices) // 2
            vol = vol[start:start + central_slices]
        studies.append(LabelledStudy(uid, labels[uid],
                                     network_input_stack(vol, (spacing[1], spacing[2]), spec)))
    if not studies:
        raise ValueError(
            f"none of the {len(labels)} studies in {csv_path} found under {dicom_root}"
        )
    return studies


def split_studies(
    studies: list[LabelledStudy], seed: int, fractions: tuple[float, float] = (0.15, 0.15)
) -> dict[Split, list[LabelledStudy]]:
    """Split by study, never by slice (slices of one patient in train and test would leak).

    Stratified: each label's studies are shuffled and dealt val/test/train by
    `fractions` (val, test), with at least one study of each label in val and
    test when the label has three or more studies.
    """
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(99,)))
    out: dict[Split, list[LabelledStudy]] = {"train": [], "val": [], "test": []}
    for label in (0, 1):
        group = [s for s in studies if s.label == label]
        order = rng.permutation(len(group))
        group = [group[i] for i in order]
        n = len(group)
        n_val = max(1 if n >= 3 else 0, int(round(fractions[0] * n)))
        n_test = max(1 if n >= 3 else 0, int(round(fractions[1] * n)))
        out["val"] += group[:n_val]
        out["test"] += group[n_val:n_val + n_test]
        out["train"] += group[n_val + n_test:]
    return out


def studies_to_slices(studies: list[LabelledStudy]) -> SliceSet:
    if not studies:
        h = w = 0
        return SliceSet(np.zeros((0, 1, h, w), np.float32), np.zeros(0, np.float32),
                        np.zeros((0, 2), np.float32), np.zeros(0, int))
    x = np.concatenate([s.slices for s in studies])[:, None]
    y = np.concatenate([np.full(len(s.slices), s.label, np.float32) for s in studies])
    groups = np.concatenate([np.full(len(s.slices), i) for i, s in enumerate(studies)])
    return SliceSet(x.astype(np.float32), y, np.full((len(y), 2), -1.0, np.float32), groups)
