"""How well the located region fits the lesion, on phantoms whose truth is known.

    .venv/bin/python bench/region.py [--studies 12] [--first-seed 1000]

For each synthetic chest CT with a nodule (model/phantom.py), the built-in
CT model analyses the study as the worker does. On the key image it
reports, the region is compared with the nodule's true cross-section there
(`phantom_nodule_mask`):

- centre error: distance from the box centre to the centre of the true
  cross-section, in mm;
- size ratio: box width and height over the true cross-section's, the mean
  of the two (1.0 is a perfect fit).

Two rows side by side, the refined region (model/region.py, what we report)
and the saliency region it starts from (half the Grad-CAM peak), with their
ratio. Studies the model calls negative, or whose key image misses the
nodule, are counted apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_io.series import load_series  # noqa: E402
from dicom_io.synthetic import write_ct_series  # noqa: E402
from model.analysis import analyse_series  # noqa: E402
from model.phantom import phantom_nodule_mask, phantom_volume  # noqa: E402
from model.region import saliency_region  # noqa: E402
from model.registry import builtin_model_dirs, load_model  # noqa: E402

SPACING = (2.5, 1.4, 1.4)
SLICES = 40


@dataclass(frozen=True)
class Fit:
    centre_mm: float
    size_ratio: float


@dataclass(frozen=True)
class StudyFit:
    seed: int
    refined: Fit
    saliency: Fit


def _fit(box: tuple[float, float, float, float], truth: np.ndarray) -> Fit:
    rows, cols = np.nonzero(truth)
    c0, r0, c1, r1 = box
    true_c, true_r = cols.mean() + 0.5, rows.mean() + 0.5
    dc, dr = (c0 + c1) / 2 - true_c, (r0 + r1) / 2 - true_r
    centre = float(np.hypot(dc * SPACING[2], dr * SPACING[1]))
    width, height = cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()
    ratio = ((c1 - c0) / width + (r1 - r0) / height) / 2
    return Fit(centre, float(ratio))


def measure(seed: int, model: object, workdir: Path) -> StudyFit | None:
    """The fit of one study's region, or None (called negative, or the key image misses)."""
    volume, _ = phantom_volume(seed, n_slices=SLICES, lesion=True, spacing=SPACING)
    truth = phantom_nodule_mask(seed, n_slices=SLICES, spacing=SPACING)
    folder = workdir / str(seed)
    paths = write_ct_series(volume, folder, spacing=SPACING, seed=seed)
    series = load_series(paths)
    result = analyse_series(series, model)  # type: ignore[arg-type]
    finding = max(result.findings, key=lambda f: f.probability)
    location = finding.location
    if not finding.present or location is None or location.box is None:
        return None
    k = series.sop_instance_uids.index(location.sop_instance_uid)
    if not truth[k].any() or result.saliency is None:
        return None
    plane = result.saliency.frames[result.saliency.source_sop_instance_uids.index(
        location.sop_instance_uid
    )]
    blob, _ = saliency_region(plane)
    rows, cols = np.nonzero(blob)
    saliency_box = (
        float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)
    )
    return StudyFit(seed, _fit(location.box, truth[k]), _fit(saliency_box, truth[k]))


def builtin_ct_model() -> object:
    return next(
        m for m in (load_model(d) for d in builtin_model_dirs())
        if "CT" in m.manifest.applies_to.modalities
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args()
    model = builtin_ct_model()
    fits, missed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.studies):
            fit = measure(seed, model, Path(tmp))
            if fit is None:
                missed += 1
            else:
                fits.append(fit)
    if not fits:
        print("no study was called positive on an image holding the nodule")
        return 1
    print(f"{len(fits)} studies measured, {missed} negative or missed the nodule")
    print(f"{'region (median / worst)':<26}{'centre error, mm':>20}{'size / lesion':>18}")
    rows = {}
    for name, pick in (("refined (reported)", "refined"), ("saliency half-peak", "saliency")):
        centres = [getattr(f, pick).centre_mm for f in fits]
        ratios = [getattr(f, pick).size_ratio for f in fits]
        centre, ratio = statistics.median(centres), statistics.median(ratios)
        worst = max(ratios, key=lambda r: abs(np.log(r)))
        rows[pick] = (centre, ratio)
        print(f"{name:<26}{centre:>12.1f} / {max(centres):<5.1f}{ratio:>10.2f} / {worst:<5.2f}")
    print(
        f"median centre error refined / saliency: {rows['refined'][0] / rows['saliency'][0]:.2f}; "
        f"size ratio refined / saliency: {rows['refined'][1] / rows['saliency'][1]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
