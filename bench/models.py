"""Models side by side on one 300-slice CT: ONNX Runtime against torch eager; 3D against MONAI.

    .venv/bin/python bench/models.py [--slices 300] [--repeats 5] [--device cpu|cuda]

The built-in CT model and its ONNX export (`model export-onnx`, logits and
class-activation map) run on the same preprocessed 300 x 512^2 chest CT, as
the worker runs them: the manifest's batch size, through `LoadedModel`.

Rows, each the median of `--repeats` runs, alternating the two runtimes so
that neither gets the warmer machine:
- probabilities of every slice (the streaming and whole-series path);
- probabilities and saliency (Grad-CAM in torch, the exported map in ONNX);
- both again on one thread, as a worker that shares its host would run.

The 3D rows: the demonstration segmentation bundle (model/bundles/ct-nodule-seg),
imported as the daemon imports it, on the same CT, against MONAI's own
pipeline for it (bench/monai_reference.py: MONAI's Orientation, Spacing,
ScaleIntensityRange, SlidingWindowInferer, then the label map back onto the
source grid):
- from the DICOM files to the label map on the source images: secondreader's
  `load_series` and `analyse_series` (which also measures each region and
  maps the probabilities back for the saliency objects) against MONAI's;
- the sliding-window inference alone, on each one's preprocessed volume.

Goals (issue 21): ONNX Runtime >= 1.5x faster than torch eager on the CPU;
the 3D model through secondreader <= 1.1x MONAI's time.
With `--device cuda` (a GPU host with onnxruntime-gpu), the GPU rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_io.series import load_series  # noqa: E402
from dicom_io.synthetic import write_ct_series  # noqa: E402
from model.export import export_onnx  # noqa: E402
from model.phantom import phantom_volume  # noqa: E402
from model.preprocess import preprocess  # noqa: E402
from model.registry import LoadedModel, builtin_model_dir, load_model  # noqa: E402

BUNDLE = ROOT / "model" / "bundles" / "ct-nodule-seg"


def _median_pair(
    a: Callable[[], object], b: Callable[[], object], repeats: int
) -> tuple[float, float]:
    a(), b()  # warm-up: first-call allocations and graph setup are not speed
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            started = time.perf_counter()
            fn()
            out.append(time.perf_counter() - started)
    return statistics.median(ta), statistics.median(tb)


def _rows(torch_model: LoadedModel, onnx_model: LoadedModel, x: np.ndarray, repeats: int,
          threads: str) -> list[tuple[str, float, float]]:  # fmt: skip
    rows = []
    t, o = _median_pair(lambda: torch_model.probabilities(x), lambda: onnx_model.probabilities(x),
                        repeats)  # fmt: skip
    rows.append((f"probabilities, {threads}", t, o))
    t, o = _median_pair(lambda: torch_model.predict(x), lambda: onnx_model.predict(x), repeats)
    rows.append((f"probabilities + saliency, {threads}", t, o))
    return rows


def _rows_3d(series_dir: Path, work: Path, repeats: int,
             device: str) -> list[tuple[str, float, float]]:  # fmt: skip
    """secondreader's 3D pipeline (first) against MONAI's own (second)."""
    from bench.monai_reference import monai_label_map_on_source, monai_probabilities
    from model.analysis import analyse_series
    from model.bundle import import_bundle
    from model.volume import preprocess_volume

    import_bundle(BUNDLE, BUNDLE / "codes.toml", work / "seg")
    model = load_model(work / "seg", device)
    files = sorted(series_dir.iterdir())
    ours_total, theirs_total = _median_pair(
        lambda: analyse_series(load_series(files), model),
        lambda: monai_label_map_on_source(series_dir, BUNDLE), repeats)  # fmt: skip
    volume = preprocess_volume(load_series(files), model.manifest.input).array
    theirs: dict[str, float] = {}
    monai_probabilities(series_dir, BUNDLE, theirs)
    infer = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.segment(volume)
        infer.append(time.perf_counter() - started)
    return [("3D: DICOM to label map on the source", ours_total, theirs_total),
            ("3D: sliding-window inference", statistics.median(infer), theirs["infer"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        volume, _ = phantom_volume(7, n_slices=args.slices, rows=args.size, cols=args.size,
                                   lesion=True)  # fmt: skip
        files = write_ct_series(volume, work / "ct", spacing=(1.0, 0.7, 0.7))
        onnx_folder = export_onnx(builtin_model_dir("ct-nodule"), work / "ct-onnx")
        torch_model = load_model(builtin_model_dir("ct-nodule"), args.device)
        onnx_model = load_model(onnx_folder, args.device)
        x = preprocess(load_series(files), torch_model.manifest.input).array
        print(f"{x.shape[0]} slices of {x.shape[1]}x{x.shape[2]} (from {args.size}^2), "
              f"batch {torch_model.manifest.inference.batch_size}; torch {torch.__version__} "
              f"on {torch_model.device}, onnxruntime on {onnx_model.device}; "
              f"{args.repeats} repeats, median")  # fmt: skip
        cores = torch.get_num_threads()
        rows = _rows(torch_model, onnx_model, x, args.repeats, f"{cores} threads")
        if args.device == "cpu" and cores > 1:
            torch.set_num_threads(1)
            one = load_model(onnx_folder, "cpu")  # its session takes torch's thread count
            rows += _rows(torch_model, one, x, args.repeats, "1 thread")
            torch.set_num_threads(cores)
        rows_3d = _rows_3d(work / "ct", work, args.repeats, args.device)
    print(f"\n{'':<40}{'torch eager':>12}{'ONNX Runtime':>14}{'speed-up':>10}")
    for label, t, o in rows:
        print(f"{label:<40}{t:>11.3f}s{o:>13.3f}s{t / o:>9.2f}x")
    print("\ngoal: ONNX Runtime >= 1.5x torch eager on the CPU")
    print(f"\n{'':<40}{'secondreader':>13}{'MONAI':>10}{'ratio':>9}")
    for label, ours, theirs in rows_3d:
        print(f"{label:<40}{ours:>12.3f}s{theirs:>9.3f}s{ours / theirs:>8.2f}x")
    print("\ngoal: the 3D model through secondreader <= 1.1x MONAI's time (ratio)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
