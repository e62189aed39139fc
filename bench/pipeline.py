"""Time each analysis stage for a 300-slice CT and a CR image; studies per hour.

    .venv/bin/python bench/pipeline.py [--slices 300] [--repeats 3] [--device auto]

Stages, as the worker runs them: load (our reader: pydicom, per-slice
rescale, QC), preprocess (SimpleITK), infer (forward passes only), saliency
(Grad-CAM on the top slices, the difference of a predict with and without
it), and the whole `analyse_series` (which also maps the saliency back onto
the source images). The peer row reads the same CT series with SimpleITK's
own DICOM series reader (GDCM), so the ratio says what our stricter reader
(per-slice rescale, gap and orientation checks) costs against it.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import SimpleITK as sitk
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_io.series import load_series  # noqa: E402
from dicom_io.synthetic import write_ct_series  # noqa: E402
from model.analysis import analyse_series  # noqa: E402
from model.phantom import phantom_volume  # noqa: E402
from model.preprocess import preprocess  # noqa: E402
from model.registry import LoadedModel, builtin_model_dirs, load_model  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sitk_read(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return reader.Execute()


def model_for(models: list[LoadedModel], modality: str) -> LoadedModel | None:
    for m in models:
        if not m.manifest.applies_to.modalities or modality in m.manifest.applies_to.modalities:
            return m
    return None


def bench_series(name: str, files: list[Path], models: list[LoadedModel], repeats: int) -> float:
    t_load, series = timed(lambda: load_series(files), repeats)
    model = model_for(models, series.modality)  # type: ignore[attr-defined]
    print(f"\n{name}: {series.n_slices} image(s) {series.image.GetSize()[:2]}")  # type: ignore[attr-defined]
    print(f"  {'load':<12}{t_load:8.2f} s")
    if model is None:
        print(f"  no built-in model applies to {series.modality}; stages after load not timed")  # type: ignore[attr-defined]
        return t_load
    spec = model.manifest.input
    t_pre, pre = timed(lambda: preprocess(series, spec), repeats)  # type: ignore[arg-type]
    t_inf, _ = timed(lambda: model.predict(pre.array, with_saliency=False), repeats)  # type: ignore[attr-defined]
    t_both, _ = timed(lambda: model.predict(pre.array), repeats)  # type: ignore[attr-defined]
    t_total, _ = timed(lambda: analyse_series(series, model), repeats)  # type: ignore[arg-type]
    print(f"  {'preprocess':<12}{t_pre:8.2f} s   ({model.manifest.name})")
    print(f"  {'infer':<12}{t_inf:8.2f} s   (device {model.device})")
    print(f"  {'saliency':<12}{max(t_both - t_inf, 0.0):8.2f} s")
    per_study = t_load + t_total
    print(f"  {'analyse':<12}{t_total:8.2f} s   (preprocess + predict + map back)")
    print(f"  {'per study':<12}{per_study:8.2f} s   -> {3600 / per_study:,.0f} studies/hour")
    return per_study


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    # The CR sample's reader warnings (MONOCHROME1, no spacing) would repeat per run.
    logging.basicConfig(level=logging.ERROR)

    models = [load_model(d, device=args.device) for d in builtin_model_dirs()]
    print("models:", ", ".join(f"{m.manifest.name} {m.manifest.version}" for m in models))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        volume, _ = phantom_volume(
            7, n_slices=args.slices, rows=512, cols=512, spacing=(1.0, 0.7, 0.7), lesion=True
        )
        files = write_ct_series(volume, folder, spacing=(1.0, 0.7, 0.7))
        t_ours, _ = timed(lambda: load_series(files), args.repeats)
        t_peer, _ = timed(lambda: sitk_read(folder), args.repeats)
        print(
            f"\nload {args.slices}-slice CT: ours {t_ours:.2f} s, SimpleITK/GDCM {t_peer:.2f} s,"
            f" ratio ours/peer time {t_ours / t_peer:.2f}"
        )
        ct = bench_series(f"CT, {args.slices} slices of 512x512", files, models, args.repeats)
        cr = bench_series(
            "CR chest (pydicom-data RG1_UNCI)",
            [Path(get_testdata_file("RG1_UNCI.dcm"))],
            models,
            args.repeats,
        )
    print(
        f"\nsustained on this machine, one worker: {3600 / ct:,.0f} CT studies/hour"
        f" or {3600 / cr:,.0f} CR studies/hour"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
