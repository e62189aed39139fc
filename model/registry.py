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

from model.inference import Prediction, as_batch, predict, probabilities
from model.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    builtin_model_dirs,
    builtin_models_root,
)
from model.results import AlgorithmInfo

log = logging.getLogger(__name__)

# Architectures are looked up only here: a manifest must not import arbitrary code.
_ARCHITECTURE_MODULES = ("model.networks",)


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
    network: nn.Module
    device: torch.device
    sha256: str

    @property
    def name(self) -> str:
        return self.manifest.name

    def algorithm_info(self) -> AlgorithmInfo:
        m = self.manifest
        return AlgorithmInfo(
            name=m.name,
            version=m.version,
            manufacturer=m.manufacturer,
            device_uid=device_uid_from_sha256(self.sha256),
            parameters={"threshold": f"{m.threshold:g}", "weights_sha256": self.sha256},
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
        batch_size: int = 32,
        saliency_top_k: int = 8,
        with_saliency: bool = True,
        known: np.ndarray | None = None,
    ) -> Prediction:
        """Probabilities and saliency for preprocessed slices (n, h, w) or (n, c, h, w).

        With `known` (from `probabilities`), only the saliency is computed.
        """
        spec = self.manifest.input
        return predict(
            self.network,
            slices,
            device=self.device,
            channels=spec.channels,
            size=spec.size,
            n_labels=len(self.manifest.labels),
            batch_size=batch_size,
            saliency_top_k=saliency_top_k,
            with_saliency=with_saliency,
            known=known,
        )

    def probabilities(self, slices: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Per-slice probabilities (n, n_labels) only: no saliency."""
        spec = self.manifest.input
        return probabilities(
            self.network,
            as_batch(slices, spec.channels, spec.size),
            device=self.device,
            n_labels=len(self.manifest.labels),
            batch_size=batch_size,
        )


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

    dev = resolve_device(device)
    if manifest.weights.format == "torchscript":
        network = torch.jit.load(io.BytesIO(data), map_location=dev)
    else:
        network = _build_network(manifest)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{weights_path} does not fit {manifest.weights.architecture}: "
                                 f"{exc}") from exc
        network = network.to(dev)
    network.eval()

    # One dummy slice: a manifest that promises other labels or input than the
    # network has fails here, at startup, rather than on the first study.
    spec = manifest.input
    probe = torch.zeros((1, spec.channels, *spec.size), device=dev)
    try:
        with torch.inference_mode():
            out = network(probe)
    except RuntimeError as exc:
        shape = tuple(probe.shape)
        raise ModelLoadError(f"{folder}: network rejects input {shape}: {exc}") from exc
    if out.ndim != 2 or out.shape[1] != len(manifest.labels):
        raise ModelLoadError(
            f"{folder}: network gives outputs {tuple(out.shape)}, "
            f"manifest lists {len(manifest.labels)} labels"
        )
    log.info("loaded model %s %s from %s on %s", manifest.name, manifest.version, folder, dev)
    return LoadedModel(folder, manifest, network, dev, actual)


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
