"""Model folders made from other formats: `model export-onnx`, `import-onnx` and `check`.

- `export_onnx` writes a state_dict model of `model.networks` as ONNX, with
  its class-activation map as a second output (`WithCam`), or a segmentation
  model (TorchScript too: an imported MONAI bundle), and refuses the export
  unless ONNX Runtime gives torch's outputs within `EXPORT_TOLERANCE`.
- `import_onnx` makes a model folder from an ONNX file and a manifest that
  the ML engineer writes; the file's SHA-256 is computed here and pinned.
  The folder is loaded and probed before it is kept: a manifest that does
  not fit the graph leaves nothing behind.
- `check_model` loads a folder, runs it on a seeded synthetic input and
  reports the shapes, the time and the codes: what a PACS administrator
  runs before adding a folder to `models.paths`.
"""

from __future__ import annotations

import io
import logging
import re
import shutil
import statistics
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from model.manifest import MANIFEST_NAME, ModelManifest, WeightsSpec
from model.networks import SliceClassifier, WithCam
from model.registry import LoadedModel, ModelLoadError, load_model, sha256_bytes

ONNX_FILE = "model.onnx"
# Float32 graphs fused differently by ONNX Runtime differ from torch by ~1e-5
# on these networks; 1e-4 is where a real export error would begin.
EXPORT_TOLERANCE = 1e-4
OPSET = 18


class ExportError(Exception):
    """The model cannot be exported, or the export does not reproduce it."""


def export_onnx(folder: Path, output: Path, *, version: str | None = None) -> Path:
    """Write `folder`'s state_dict model as an ONNX model folder at `output` (must not exist)."""
    loaded = load_model(folder, "cpu")
    network = loaded.network
    if loaded.manifest.kind == "segmentation":
        return _export_segmentation(loaded, output, version)
    if isinstance(network, torch.jit.ScriptModule) or not isinstance(network, SliceClassifier):
        raise ExportError(f"{folder}: only state_dict models of model.networks.SliceClassifier "
                          "export here; other networks export from their own code")
    spec = loaded.manifest.input
    wrapper = WithCam(network).eval()
    example = torch.zeros((2, spec.channels, *spec.size))
    batch = torch.export.Dim("n", min=1, max=4096)
    for name in ("onnx_ir", "onnxscript"):  # their INFO lines are the exporter's diary
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / ONNX_FILE
        torch.onnx.export(
            wrapper, (example,), path, input_names=["image"], output_names=["logits", "cam"],
            dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False,
            external_data=False,
        )
        data = path.read_bytes()
    manifest = loaded.manifest.model_copy(update={
        "version": version or loaded.manifest.version,
        "weights": WeightsSpec(file=ONNX_FILE, sha256=sha256_bytes(data), format="onnx",
                               outputs=["logits", "cam"]),
    })
    made = _make_folder(output, manifest, data)
    _check_export(loaded, made)
    return output


def _export_segmentation(loaded: LoadedModel, output: Path, version: str | None) -> Path:
    """A 3D segmentation network (state_dict or TorchScript) as ONNX, batch axis free.

    TorchScript-based export: the dynamo exporter cannot trace a ScriptModule,
    which is what MONAI bundles ship. Checked on two random windows.
    """
    m = loaded.manifest
    assert m.inference.roi_size is not None
    example = torch.zeros((1, m.input.channels, *m.inference.roi_size))
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and norm notes
        path = Path(scratch) / ONNX_FILE
        torch.onnx.export(
            loaded.network, (example,), path, input_names=["image"],
            output_names=["segmentation"], opset_version=OPSET, dynamo=False,
            dynamic_axes={"image": {0: "n"}, "segmentation": {0: "n"}},
        )
        data = path.read_bytes()
    manifest = m.model_copy(update={
        "version": version or m.version,
        "weights": WeightsSpec(file=ONNX_FILE, sha256=sha256_bytes(data), format="onnx",
                               outputs=["segmentation"]),
    })
    made = _make_folder(output, manifest, data)
    x = np.random.default_rng(0).random((2, m.input.channels, *m.inference.roi_size),
                                         dtype=np.float32)  # fmt: skip
    worst = float(np.abs(loaded.runtime.named(x)["segmentation"]
                         - made.runtime.named(x)["segmentation"]).max())  # fmt: skip
    if worst > EXPORT_TOLERANCE:
        shutil.rmtree(made.folder, ignore_errors=True)
        raise ExportError(f"the ONNX export differs from torch by {worst:.2g} "
                          f"(tolerance {EXPORT_TOLERANCE}): not written")
    return output


def _check_export(original: LoadedModel, exported: LoadedModel) -> None:
    spec = original.manifest.input
    x = np.random.default_rng(0).normal(size=(8, spec.channels, *spec.size)).astype(np.float32)
    torch_logits, _ = original.runtime.forward(x)
    onnx_logits, cam = exported.runtime.forward(x)
    network = original.network
    assert isinstance(network, SliceClassifier)  # export_onnx checked
    with torch.inference_mode():
        _, torch_cam = WithCam(network).eval()(torch.from_numpy(x))
    worst = float(np.abs(torch_logits - onnx_logits).max())
    worst_cam = float(np.abs(torch_cam.numpy() - cam).max()) if cam is not None else np.inf
    if max(worst, worst_cam) > EXPORT_TOLERANCE:
        shutil.rmtree(exported.folder, ignore_errors=True)
        raise ExportError(f"the ONNX export differs from torch by {max(worst, worst_cam):.2g} "
                          f"(tolerance {EXPORT_TOLERANCE}): not written")


def import_onnx(onnx_file: Path, manifest_file: Path, into: Path) -> Path:
    """A model folder at `into` (must not exist) from an ONNX file and its manifest TOML.

    The manifest's [weights] may leave out `file`, `sha256` and `format`:
    they are this file. If it gives a SHA-256, it must be this file's.
    """
    data = Path(onnx_file).read_bytes()
    digest = sha256_bytes(data)
    with Path(manifest_file).open("rb") as fh:
        raw = tomllib.load(fh)
    weights = dict(raw.get("weights") or {})
    if "sha256" in weights and str(weights["sha256"]).lower() != digest:
        raise ModelLoadError(f"{onnx_file} has SHA-256 {digest}, its manifest names "
                             f"{weights['sha256']}: not the file the manifest was written for")
    if weights.get("format", "onnx") != "onnx":
        raise ModelLoadError(f"{manifest_file} says format {weights['format']!r}, not onnx")
    raw["weights"] = weights | {"file": ONNX_FILE, "sha256": digest, "format": "onnx"}
    _make_folder(into, vouched_manifest(raw, manifest_file), data)
    return into


def folder_name(manifest: ModelManifest) -> str:
    """NAME-VERSION as one safe folder name (a name may hold "/" or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{manifest.name}-{manifest.version}")


def vouched_manifest(
    raw: dict[str, Any], source: Path, error: type[ModelLoadError] = ModelLoadError
) -> ModelManifest:
    """The manifest an ML engineer wrote for a model from elsewhere: valid, and saying what
    the model is for (a model without its stated use and limits is not imported)."""
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise error(f"{source}: {exc}") from exc
    if not manifest.intended_use.strip():
        raise error(f"{source}: intended_use is empty; say what the model is for and its "
                    "limits (and 'not for clinical use' if so)")
    return manifest


def _make_folder(into: Path, manifest: ModelManifest, data: bytes) -> LoadedModel:
    """Write manifest and weights beside `into`, load and probe them, then rename into place."""
    into = Path(into)
    if into.exists():
        raise FileExistsError(f"{into} exists: choose another folder")
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.", dir=into.parent))
    try:
        (staging / manifest.weights.file).write_bytes(data)
        manifest.write(staging / MANIFEST_NAME)
        loaded = load_model(staging, "cpu")  # refuses a graph that does not fit the manifest
        staging.rename(into)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(loaded, folder=into)  # the same bytes, checked once


@dataclass(frozen=True)
class CheckReport:
    folder: Path
    name: str
    version: str
    runtime: str
    device: str
    input_shape: tuple[int, ...]
    logits_shape: tuple[int, ...]
    cam_shape: tuple[int, ...] | None
    saliency: str  # where the saliency objects come from
    milliseconds_per_slice: float  # per window, for a 3D model
    labels: list[str]  # "nodule: finding 27925004 (SCT) Nodule, site 39607008 (SCT) Lung"
    calibration: str
    intended_use: str
    kind: str = "classification"


def check_model(folder: Path, device: str = "auto", n: int = 8) -> CheckReport:
    """Load a model folder, run it on a seeded synthetic batch, and describe what it gave."""
    loaded = load_model(folder, device)
    m = loaded.manifest
    three_d = m.input.dims == "3d"
    grid: tuple[int, ...] = m.input.size
    if three_d:  # windows of the sliding-window inference
        assert m.inference.roi_size is not None
        n, grid = min(n, m.inference.batch_size), m.inference.roi_size
    shape = (n, m.input.channels, *grid)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if m.kind == "segmentation":
            return loaded.runtime.named(batch)["segmentation"], None
        if m.kind == "detection":
            return loaded.runtime.named(batch)["detections"], None
        return loaded.runtime.forward(batch)

    run(x[:1])  # warm-up: first-call allocation is not the model's speed
    times, outputs = [], run(x)
    for _ in range(3):
        started = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - started)
    logits, cam = outputs
    if m.kind == "segmentation":
        saliency = "the segmentation's per-voxel probabilities"
    elif loaded.runtime.has_cam:
        saliency = "the model's class-activation map"
    elif loaded.runtime.explainable() is not None:
        saliency = "Grad-CAM"
    else:
        saliency = "none (TorchScript or ONNX without a 'cam' output)"
    calibration = "none: the probability is the plain sigmoid of the logit"
    if m.kind == "segmentation":
        calibration = (f"none: per voxel, the {m.segmentation_spec.activation} of the "
                       "network's output")
    if m.calibration is not None:
        c = m.calibration
        calibration = f"{c.method}, slope {c.slope:g}, intercept {c.intercept:g} ({c.fitted_on})"
    return CheckReport(
        folder=Path(folder), name=m.name, version=m.version, runtime=loaded.runtime.name,
        device=str(loaded.device), input_shape=tuple(x.shape), logits_shape=tuple(logits.shape),
        cam_shape=None if cam is None else tuple(cam.shape), saliency=saliency,
        milliseconds_per_slice=round(1000 * statistics.median(times) / n, 3),
        labels=[f"{lb.name}: finding {lb.finding.value} ({lb.finding.scheme}) "
                f"{lb.finding.meaning}, site {lb.site.value} ({lb.site.scheme}) {lb.site.meaning}"
                for lb in m.labels],
        calibration=calibration, intended_use=m.intended_use, kind=m.kind,
    )


def torchscript_with_cam(folder: Path, output: Path) -> Path:
    """`folder`'s SliceClassifier traced to TorchScript with its class-activation map.

    What an ML engineer's TorchScript export looks like when it carries its
    own map: the daemon then has saliency for it, which Grad-CAM cannot give
    (TorchScript takes no Python hooks).
    """
    loaded = load_model(folder, "cpu")
    network = loaded.network
    if not isinstance(network, SliceClassifier):
        raise ExportError(f"{folder}: not a SliceClassifier")
    spec = loaded.manifest.input
    example = torch.zeros((2, spec.channels, *spec.size))
    with torch.inference_mode(False):
        traced = torch.jit.trace(WithCam(network).eval(), example, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    data = buffer.getvalue()
    manifest = loaded.manifest.model_copy(update={
        "weights": WeightsSpec(file="model.ts", sha256=sha256_bytes(data), format="torchscript",
                               outputs=["logits", "cam"]),
    })
    _make_folder(output, manifest, data)
    return output
