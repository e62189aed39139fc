"""Loading model folders, checking them, and choosing the models that apply to a series.

A model folder is `manifest.toml` plus a weights file. The weights' SHA-256
is checked against the manifest before torch sees a byte of them: a model
that is not the one that was validated must not produce results. The bytes
that were hashed are the bytes that are loaded, so the file cannot change in
between.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.inference import (
    Prediction,
    as_batch,
    forward_logits,
    forward_output,
    predict,
    probabilities,
)
from model.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    SegmentationSpec,
    builtin_model_dirs,
    builtin_models_root,
)
from model.results import AlgorithmInfo
from model.runtimes import OnnxRuntime, Runtime, TorchRuntime, Transposed, classification
from model.volume import from_network, network_volume, sliding_window

log = logging.getLogger(__name__)

# Architectures are looked up only here: a manifest must not import arbitrary code.
_ARCHITECTURE_MODULES = ("model.networks", "monai.networks.nets")
# The MONAI networks a manifest (or an imported bundle) may name: 2D/3D
# classifiers and segmentation networks that build offline from literal arguments. Networks whose
# constructors download weights (EfficientNet, the torchvision wrappers) are not here.
MONAI_NETWORKS = frozenset({"DenseNet121", "DenseNet169", "DenseNet201", "ResNet",
                            # 3D segmentation networks (output channels, not logits)
                            "UNet", "BasicUNet", "SegResNet"})


class ModelIntegrityError(Exception):
    """The weights file is not the one the manifest was written for."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"weights file {path} has SHA-256 {actual}, but its manifest expects {expected}: "
            "refusing to load a model that is not the one validated"
        )
        self.path = path
        self.expected = expected
        self.actual = actual


class ModelLoadError(Exception):
    """The model folder is incomplete or does not fit its manifest."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def device_uid_from_sha256(sha256: str) -> str:
    """A "2.25." UID (ISO/IEC 9834-8) from the first 128 bits of the weights hash.

    Deterministic, so every daemon running the same weights reports the same
    device, and a retrained model is a new device, as IHE AI Results asks.
    """
    return f"2.25.{int(sha256[:32], 16)}"


def builtin_model_dir(name: str = "ct-nodule") -> Path:
    """The folder of a model shipped with secondreader (default: the CT nodule demo)."""
    folder = builtin_models_root() / name
    if not (folder / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"no built-in model {name!r} in {builtin_models_root()}")
    return folder




def _build_network(manifest: ModelManifest) -> nn.Module:
    spec = manifest.weights.architecture
    if not spec or ":" not in spec:
        raise ModelLoadError("a state_dict model needs weights.architecture = 'module:Class'")
    module_name, _, class_name = spec.partition(":")
    if module_name not in _ARCHITECTURE_MODULES:
        raise ModelLoadError(
            f"architecture module {module_name!r} is not one of {_ARCHITECTURE_MODULES}; "
            "ship other architectures as TorchScript"
        )
    if module_name == "monai.networks.nets":
        if class_name not in MONAI_NETWORKS:
            raise ModelLoadError(f"MONAI network {class_name!r} is not one of "
                                 f"{sorted(MONAI_NETWORKS)}; ship it as TorchScript")
        if any("pretrain" in key and value for key, value in manifest.weights.arguments.items()):
            raise ModelLoadError(f"{spec}: pretrained weights would be downloaded; the weights "
                                 "are the model folder's file")
    # monai is imported here only, when a manifest names one of its networks.
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"{spec} is not a torch.nn.Module class")
    try:
        return cls(**manifest.weights.arguments)
    except TypeError as exc:
        args = manifest.weights.arguments
        raise ModelLoadError(f"cannot build {spec} with {args}: {exc}") from exc


@dataclass
class LoadedModel:
    folder: Path
    manifest: ModelManifest
    runtime: Runtime
    sha256: str

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def network(self) -> nn.Module:
        """The torch network (state_dict or TorchScript models only)."""
        if not isinstance(self.runtime, TorchRuntime):
            raise AttributeError(f"{self.name} runs on {self.runtime.name}, not torch")
        return self.runtime.network

    def algorithm_info(self) -> AlgorithmInfo:
        m = self.manifest
        parameters = {"threshold": f"{m.threshold:g}", "weights_sha256": self.sha256,
                      "runtime": self.runtime.name}
        if m.calibration is not None:
            parameters["calibration"] = (f"{m.calibration.method} slope {m.calibration.slope:g} "
                                         f"intercept {m.calibration.intercept:g}")
        return AlgorithmInfo(
            name=m.name,
            version=m.version,
            manufacturer=m.manufacturer,
            device_uid=device_uid_from_sha256(self.sha256),
            parameters=parameters,
            evaluation=tuple(m.evaluation.lines()) if m.evaluation is not None else (),
        )

    def applicability(
        self,
        modality: str | None,
        body_part: str | None = None,
        series_description: str | None = None,
        n_slices: int = 1,
    ) -> str | None:
        """None if the model applies to this series, else the reason, for the user.

        An absent BodyPartExamined does not exclude a series: the attribute is
        optional and many modalities leave it empty; modality and slice count
        still have to fit.
        """
        rule = self.manifest.applies_to
        name = self.manifest.name
        wanted = [m.upper() for m in rule.modalities]
        if wanted and (modality or "").strip().upper() not in wanted:
            return f"{name} is for {'/'.join(wanted)}, not modality {modality or '(none)'}"
        parts = [b.upper() for b in rule.body_parts]
        if parts and body_part and body_part.strip().upper() not in parts:
            return f"{name} is for body parts {'/'.join(parts)}, not {body_part}"
        if rule.series_description:
            desc = (series_description or "").lower()
            if not any(fnmatchcase(desc, pat.lower()) for pat in rule.series_description):
                return (
                    f"{name} needs a series description matching "
                    f"{' or '.join(rule.series_description)}"
                )
        if n_slices < rule.min_slices:
            return f"{name} needs at least {rule.min_slices} images, the series has {n_slices}"
        return None

    def predict(
        self,
        slices: np.ndarray,
        *,
        batch_size: int | None = None,
        saliency_top_k: int = 8,
        with_saliency: bool = True,
        known: np.ndarray | None = None,
    ) -> Prediction:
        """Calibrated probabilities and saliency for preprocessed slices (n, h, w) or (n, c, h, w).

        With `known` (from `probabilities`), only the saliency is computed.
        The batch size defaults to the manifest's.
        """
        m = self.manifest
        return predict(
            self.runtime,
            slices,
            channels=m.input.channels,
            size=m.input.size,
            n_labels=len(m.labels),
            batch_size=batch_size or m.inference.batch_size,
            saliency_top_k=saliency_top_k,
            with_saliency=with_saliency,
            known=known,
            calibration=m.calibration,
        )

    def probabilities(self, slices: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Per-slice calibrated probabilities (n, n_labels) only: no saliency."""
        m = self.manifest
        return probabilities(
            self.runtime,
            as_batch(slices, m.input.channels, m.input.size),
            n_labels=len(m.labels),
            batch_size=batch_size or m.inference.batch_size,
            calibration=m.calibration,
        )

    def detections(self, slices: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """A detector's boxes per slice (n, k, 6): x0, y0, x1, y1 (network pixels), score
        logit, label index; batched as the manifest says."""
        m = self.manifest
        x = as_batch(slices, m.input.channels, m.input.size)
        if len(x) == 0:
            return np.zeros((0, 0, 6), dtype=np.float32)
        return forward_output(self.runtime, x, "detections", batch_size or m.inference.batch_size)

    def detections_3d(self, volume: np.ndarray) -> np.ndarray:
        """A 3D detector's boxes (k, 8) in a preprocessed volume (z, y, x): x0, y0, z0, x1,
        y1, z1 (network voxels, x along columns: ITK's index order), score logit, label."""
        m = self.manifest
        found = self.runtime.named(network_volume(volume, m.input))["detections"]
        if found.ndim != 3 or found.shape[0] != 1 or found.shape[2] != 8:
            raise ValueError(f"model {m.name} gave detections {found.shape} for one volume: "
                             "expected (1, k, 8)")
        boxes = found[0].copy()
        if m.input.layout == "rows_columns":  # its array is (z, y, x): its boxes say z, y, x
            boxes[:, [0, 1, 2, 3, 4, 5]] = boxes[:, [2, 1, 0, 5, 4, 3]]
        return boxes

    def segment(self, volume: np.ndarray) -> np.ndarray:
        """A segmentation model's per-voxel probabilities (channels, z, y, x) for a
        preprocessed volume (z, y, x): sliding windows, blended, then the activation."""
        m = self.manifest
        batch = m.inference.batch_size

        def forward(windows: np.ndarray) -> np.ndarray:
            return forward_output(self.runtime, windows, "segmentation", batch)

        blended = from_network(sliding_window(network_volume(volume, m.input), forward,
                                              m.inference), m.input)  # fmt: skip
        return activate(blended, m.segmentation_spec)

    def logits(self, slices: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
        """Per-slice logits (n, n_labels), before calibration: what a calibration is fitted on."""
        m = self.manifest
        x = as_batch(slices, m.input.channels, m.input.size)
        return forward_logits(self.runtime, x, batch_size or m.inference.batch_size)


def activate(blended: np.ndarray, spec: SegmentationSpec) -> np.ndarray:
    """Blended logits (channels, ...) as probabilities: softmax over channels, or sigmoids."""
    z = blended.astype(np.float64)
    if spec.activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    z -= z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def load_model(folder: Path, device: str | torch.device = "auto") -> LoadedModel:
    """Read the manifest, verify the weights' SHA-256, load them and check the output size.

    Raises ModelIntegrityError on a hash mismatch, ModelLoadError when the
    folder does not fit its manifest, pydantic.ValidationError on a bad manifest.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelLoadError(f"no {MANIFEST_NAME} in {folder}")
    manifest = ModelManifest.from_file(manifest_path)
    weights_path = folder / manifest.weights.file
    if not weights_path.is_file():
        raise ModelLoadError(f"weights file {weights_path} named by {manifest_path} is missing")
    data = weights_path.read_bytes()
    actual = sha256_bytes(data)
    if actual != manifest.weights.sha256:
        raise ModelIntegrityError(weights_path, manifest.weights.sha256, actual)

    runtime = _runtime(folder, manifest, data, resolve_device(device))
    _probe(folder, manifest, runtime)
    log.info("loaded model %s %s from %s on %s (%s)", manifest.name, manifest.version, folder,
             runtime.device, runtime.name)
    return LoadedModel(folder, manifest, runtime, actual)


def _runtime(folder: Path, manifest: ModelManifest, data: bytes, dev: torch.device) -> Runtime:
    spec = manifest.weights
    if spec.format == "onnx":
        try:
            onnx = OnnxRuntime(data, dev, spec.outputs)
            return Transposed(onnx) if _transposed(manifest) else onnx
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise ModelLoadError(f"{folder}: ONNX Runtime cannot load {spec.file}: {exc}") from exc
    if spec.format == "torchscript":
        network = torch.jit.load(io.BytesIO(data), map_location=dev)
    else:
        network = _build_network(manifest)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{folder / spec.file} does not fit {spec.architecture}: "
                                 f"{exc}") from exc
        network = network.to(dev)
    network.eval()
    runtime = TorchRuntime(network, dev, spec.outputs, manifest.inference.gpu_precision)
    return Transposed(runtime) if _transposed(manifest) else runtime


def _transposed(manifest: ModelManifest) -> bool:
    """A 2D network reading (x, y) slices; a 3D one's axes are turned by `model.volume`."""
    return manifest.input.layout == "columns_rows" and manifest.input.dims == "2d"


def _probe(folder: Path, manifest: ModelManifest, runtime: Runtime) -> None:
    """Two dummy slices: a manifest that promises other labels, input or outputs than the
    network has fails here, at startup, rather than on the first study."""
    spec = manifest.input
    n_labels = len(manifest.labels)
    if manifest.kind == "segmentation":
        _probe_segmentation(folder, manifest, runtime)
        return
    if manifest.input.dims == "3d":
        _probe_detection_3d(folder, manifest, runtime)
        return
    probe = np.zeros((2, spec.channels, *spec.size), dtype=np.float32)
    try:
        found = runtime.named(probe)
    except Exception as exc:  # torch, TorchScript and onnxruntime each raise their own
        raise ModelLoadError(f"{folder}: network rejects input {probe.shape}: {exc}") from exc
    if manifest.kind == "detection":
        boxes = found["detections"]
        if boxes.ndim != 3 or boxes.shape[0] != 2 or boxes.shape[2] != 6:
            raise ModelLoadError(f"{folder}: detections {boxes.shape} for 2 slices: expected "
                                 "(2, k, 6): x0, y0, x1, y1, score logit, label index")
        return
    logits, cam = classification(found)
    if logits.shape != (2, n_labels):
        raise ModelLoadError(f"{folder}: network gives logits {logits.shape} for 2 slices, "
                             f"manifest lists {n_labels} labels")
    if cam is not None and (cam.ndim != 4 or cam.shape[:2] != (2, n_labels)):
        raise ModelLoadError(f"{folder}: class-activation map {cam.shape} for 2 slices: "
                             f"expected (2, {n_labels}, h, w)")


def _probe_segmentation(folder: Path, manifest: ModelManifest, runtime: Runtime) -> None:
    roi = manifest.inference.roi_size
    assert roi is not None
    probe = np.zeros((1, manifest.input.channels, *roi), dtype=np.float32)
    try:
        out = runtime.named(probe)["segmentation"]
    except Exception as exc:  # torch, TorchScript and onnxruntime each raise their own
        raise ModelLoadError(f"{folder}: network rejects a window {probe.shape}: {exc}") from exc
    expected = (1, manifest.output_channels(), *roi)
    if out.shape != expected:
        raise ModelLoadError(f"{folder}: segmentation {out.shape} for a window {probe.shape}: "
                             f"expected {expected} ({len(manifest.labels)} labels, "
                             f"{manifest.segmentation_spec.activation})")


def _probe_detection_3d(folder: Path, manifest: ModelManifest, runtime: Runtime) -> None:
    probe = np.zeros((1, manifest.input.channels, 32, 32, 32), dtype=np.float32)
    try:
        boxes = runtime.named(probe)["detections"]
    except Exception as exc:  # torch, TorchScript and onnxruntime each raise their own
        raise ModelLoadError(f"{folder}: network rejects a volume {probe.shape}: {exc}") from exc
    if boxes.ndim != 3 or boxes.shape[0] != 1 or boxes.shape[2] != 8:
        raise ModelLoadError(f"{folder}: detections {boxes.shape} for one volume: expected "
                             "(1, k, 8): x0, y0, z0, x1, y1, z1, score logit, label index")


class ModelRegistry:
    """The configured models, loaded once at startup; `select` picks those for a series."""

    def __init__(
        self, folders: Sequence[Path] | None = None, device: str | torch.device = "auto"
    ) -> None:
        folders = builtin_model_dirs() if folders is None else list(folders)
        self.models: list[LoadedModel] = []
        for folder in folders:
            loaded = load_model(folder, device)
            # Two versions of one model may run side by side (champion and
            # challenger, each with its own mode); the same version twice may not.
            version = loaded.manifest.version
            if any(m.name == loaded.name and m.manifest.version == version for m in self.models):
                raise ModelLoadError(
                    f"two configured models are named {loaded.name!r}, version {version!r}"
                )
            self.models.append(loaded)

    def __len__(self) -> int:
        return len(self.models)

    def get(self, name: str) -> LoadedModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def select(
        self,
        modality: str | None,
        body_part: str | None = None,
        series_description: str | None = None,
        n_slices: int = 1,
    ) -> list[LoadedModel]:
        """The models that apply to the series (see `LoadedModel.applicability`)."""
        return [m for m in self.models
                if m.applicability(modality, body_part, series_description, n_slices) is None]

    def reasons(
        self,
        modality: str | None,
        body_part: str | None = None,
        series_description: str | None = None,
        n_slices: int = 1,
    ) -> dict[str, str]:
        """Model name -> why it does not apply, for the models that do not."""
        out: dict[str, str] = {}
        for m in self.models:
            reason = m.applicability(modality, body_part, series_description, n_slices)
            if reason is not None:
                out[m.name] = reason
        return out
