"""MONAI's own pipeline for the ct_nodule_seg_3d bundle on a DICOM CT series: the reference.

    .venv/bin/python bench/monai_reference.py SERIES_DIR [--bundle model/bundles/ct-nodule-seg]

What secondreader's 3D segmentation path is compared against, voxel by voxel,
by the model bench and by tests/test_segmentation_model.py. It does what the
bundle's configs/inference.json says, with MONAI's transforms built here in
code (the config is never parsed: MONAI's ConfigParser evaluates expressions):

1. Load as MONAI's ITKReader would, through SimpleITK (`itk` cannot be
   installed here): the series' files in GDCM's order, HU by the rescale
   SimpleITK applies, array (1, X, Y, Z) (the transpose of SimpleITK's
   (z, y, x)), affine from direction * spacing and origin in LPS, turned to
   RAS by diag(-1, -1, 1, 1). EnsureChannelFirst has nothing left to do.
2. Orientation("RAS"). Not a no-op: an axial DICOM series indexes towards
   Left and Posterior, so its RAS affine has -x, -y columns and Orientation
   flips the first two axes. (MONAI's Orientation needs nibabel, which the
   test extras install.)
3. Spacing(2 mm, bilinear), ScaleIntensityRange(-1000..500 -> 0..1, clipped).
4. SlidingWindowInferer(64^3, sw_batch_size 4, overlap 0.25, gaussian) with
   the TorchScript network; softmax over channels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Orientation, ScaleIntensityRange, Spacing

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Timings = dict[str, float]


def read_series(series_dir: Path) -> sitk.Image:
    """The series as one float32 SimpleITK image in HU, slices in GDCM's order."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir))
    if not names:
        raise ValueError(f"{series_dir}: no DICOM series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return sitk.Cast(reader.Execute(), sitk.sitkFloat32)


def ras_affine(image: sitk.Image) -> np.ndarray:
    """ITKReader's affine: index (x, y, z) -> RAS mm."""
    lps = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return LPS_RAS @ lps


def to_metatensor(image: sitk.Image) -> MetaTensor:
    """(1, X, Y, Z) float32 with the RAS affine, as LoadImage + EnsureChannelFirst give."""
    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr))[None],
                      affine=torch.from_numpy(ras_affine(image)))


def orient_ras(img: MetaTensor) -> MetaTensor:
    result = Orientation(axcodes="RAS")(img)
    assert isinstance(result, MetaTensor)
    return result


def _run(series_dir: Path, bundle: Path, timings: Timings | None
         ) -> tuple[np.ndarray, np.ndarray, sitk.Image]:
    t: Timings = {} if timings is None else timings
    t0 = time.perf_counter()
    source = read_series(series_dir)
    loaded = to_metatensor(source)
    t["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    spaced = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear")(orient_ras(loaded))
    img = ScaleIntensityRange(a_min=-1000, a_max=500, b_min=0.0, b_max=1.0, clip=True)(spaced)
    assert isinstance(img, MetaTensor)
    t["preprocess"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    net = torch.jit.load(str(Path(bundle) / "models" / "model.ts"), map_location="cpu").eval()
    t["load_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    inferer = SlidingWindowInferer(roi_size=(64, 64, 64), sw_batch_size=4, overlap=0.25,
                                   mode="gaussian")
    with torch.no_grad():
        logits = inferer(img.as_tensor()[None], net)
        assert isinstance(logits, torch.Tensor)
        probs = torch.softmax(logits[0], dim=0).numpy()
    t["infer"] = time.perf_counter() - t0
    return probs, img.affine.numpy().astype(np.float64), source


def monai_probabilities(series_dir: Path, bundle: Path, timings: Timings | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (2, X, Y, Z) on the 2 mm RAS grid, and that grid's RAS affine.

    `timings`, when given, receives seconds per step (read, preprocess,
    load_model, infer).
    """
    probs, affine, _ = _run(series_dir, bundle, timings)
    return probs, affine


def to_source_grid(label_xyz: np.ndarray, affine_ras: np.ndarray, source: sitk.Image
                   ) -> np.ndarray:
    """A label map on a RAS grid, nearest neighbour through physical space onto `source`."""
    lps = LPS_RAS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(label_xyz.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    out = sitk.Resample(image, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def monai_label_map_on_source(series_dir: Path, bundle: Path, timings: Timings | None = None
                              ) -> np.ndarray:
    """The argmax label map on the source series' grid: (z, y, x) uint8, SimpleITK's order."""
    t: Timings = {} if timings is None else timings
    probs, affine, source = _run(series_dir, bundle, t)
    t0 = time.perf_counter()
    label = probs.argmax(0).astype(np.uint8)
    out = to_source_grid(label, affine, source)
    t["to_source"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("series_dir", type=Path)
    p.add_argument("--bundle", type=Path,
                   default=Path(__file__).resolve().parent.parent / "model/bundles/ct-nodule-seg")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    timings: Timings = {}
    label = monai_label_map_on_source(a.series_dir, a.bundle, timings)
    print(f"nodule voxels on the source grid: {int((label == 1).sum())} of {label.size}")
    for step, seconds in timings.items():
        print(f"{step:>12}: {seconds:7.3f} s")


if __name__ == "__main__":
    main()
