"""Running a loaded model's runtime on preprocessed slices.

The forward pass runs batched on the model's runtime (`model.runtimes`:
torch or ONNX Runtime). A CUDA out-of-memory error (a busy shared GPU, a
large series) halves the batch and retries, down to one slice, rather than
failing the study. Probabilities are the sigmoid of the logits, through the
manifest's calibration where it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from model.manifest import Calibration
from model.runtimes import Runtime, RuntimeOutputError
from model.saliency import grad_cam, target_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Per-slice outputs for one series.

    `probabilities` (n, n_labels) float32. `saliency` (n, h, w) float32 in
    [0, 1]: the model's class-activation map, or Grad-CAM, on the `top_k`
    most suspicious slices, each map scaled to peak at that slice's
    probability so a faint map means weak evidence; zeros elsewhere. None
    when saliency was not asked for, or the model exports no map and has no
    torch network to hook (TorchScript or ONNX without a "cam" output).
    """

    probabilities: np.ndarray
    saliency: np.ndarray | None


def as_batch(slices: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) or (n, c, h, w) float32 -> (n, c, h, w), checked against the manifest."""
    x = np.asarray(slices, dtype=np.float32)
    if x.ndim == 3 and channels == 1:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != tuple(size):
        raise ValueError(
            f"slices of shape {x.shape} do not match the model input (n, {channels}, "
            f"{size[0]}, {size[1]}): was the series preprocessed for this model?"
        )
    if not np.isfinite(x).all():
        raise ValueError("slices contain NaN or infinite values")
    return x


def run_batched(
    n: int,
    batch_size: int,
    device: torch.device,
    step: Callable[[slice], np.ndarray],
) -> list[np.ndarray]:
    """`step` over consecutive chunks of n items; halves the chunk on CUDA out-of-memory.

    A smaller batch is slower but gives the same numbers, so a GPU shared
    with other work degrades instead of failing the job.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out: list[np.ndarray] = []
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        try:
            out.append(step(slice(start, stop)))
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("CUDA out of memory; retrying with batch size %d", batch_size)
            continue
        start = stop
    return out


def forward_output(runtime: Runtime, x: np.ndarray, role: str, batch_size: int = 32) -> np.ndarray:
    """One of the runtime's outputs, by its role, for batch-shaped input; batched, halving
    the batch on CUDA out-of-memory."""

    def step(part: slice) -> np.ndarray:
        found = runtime.named(x[part])
        if role not in found:
            raise RuntimeOutputError(f"the network gives no {role!r} output")
        return found[role]

    out = run_batched(x.shape[0], batch_size, runtime.device, step)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def forward_logits(runtime: Runtime, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits (n, n_out) float32, batched; halves the batch on CUDA out-of-memory."""
    return forward_output(runtime, x, "logits", batch_size)


def calibrated(logits: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """Probabilities from logits: sigmoid(slope * logit + intercept), or the plain sigmoid."""
    z = np.asarray(logits, dtype=np.float64)
    if calibration is not None:
        z = calibration.slope * z + calibration.intercept
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _checked_logits(logits: np.ndarray, n: int, n_labels: int) -> np.ndarray:
    if logits.ndim != 2 or logits.shape != (n, n_labels):
        raise ValueError(f"network gives logits of shape {logits.shape} for {n} slices, "
                         f"manifest has {n_labels} labels")
    return logits


def probabilities(
    runtime: Runtime,
    x: np.ndarray,
    *,
    n_labels: int,
    batch_size: int,
    calibration: Calibration | None = None,
) -> np.ndarray:
    """Calibrated probabilities (n, n_labels) of batch-shaped input (see `as_batch`)."""
    logits = _checked_logits(forward_logits(runtime, x, batch_size), x.shape[0], n_labels)
    return calibrated(logits, calibration)


def cam_saliency(cam: np.ndarray, labels: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Maps (k, h, w) in [0, 1] from a model's own class-activation maps (k, labels, h', w').

    As Grad-CAM does it: the chosen label's map, positive part, bilinear to
    the input size, scaled to peak at 1. For a network whose head is a 1x1
    convolution before a pooling of the logit map, the bias-free logit map is
    exactly its Grad-CAM (`model.networks.WithCam`).
    """
    if cam.ndim != 4 or cam.shape[0] != len(labels):
        raise ValueError(f"class-activation maps of shape {cam.shape} for {len(labels)} slices")
    chosen = torch.from_numpy(cam[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)])
    maps = F.relu(chosen[:, None].float())
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = maps.amax(dim=(1, 2), keepdim=True)
    maps = torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))
    return maps.clamp_(0.0, 1.0).numpy().astype(np.float32)


def predict(
    runtime: Runtime,
    slices: np.ndarray,
    *,
    channels: int,
    size: tuple[int, int],
    n_labels: int,
    batch_size: int = 32,
    saliency_top_k: int = 8,
    with_saliency: bool = True,
    known: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> Prediction:
    """Probabilities (one independent, calibrated output per label) and saliency.

    The saliency is the model's own class-activation map where it exports
    one, else Grad-CAM where the runtime has a torch network to hook, else
    None. `known`: the slices' probabilities, computed earlier by
    `probabilities` (slice by slice as the images arrived); only the
    saliency is computed here.
    """
    x = as_batch(slices, channels, size)
    n = x.shape[0]
    if n == 0:
        sal = np.zeros((0, *size), dtype=np.float32) if with_saliency else None
        return Prediction(np.zeros((0, n_labels), dtype=np.float32), sal)
    if known is None:
        probs = probabilities(runtime, x, n_labels=n_labels, batch_size=batch_size,
                              calibration=calibration)
    else:
        probs = np.asarray(known, dtype=np.float32)
        if probs.shape != (n, n_labels):
            raise ValueError(
                f"known probabilities of shape {probs.shape}, expected {(n, n_labels)}"
            )
    if not with_saliency:
        return Prediction(probs, None)
    network = runtime.explainable()
    layer = None if network is None else target_layer(network)
    if not runtime.has_cam and layer is None:
        log.debug("%s exports no class-activation map and has no layer to hook: no saliency",
                  runtime.name)
        return Prediction(probs, None)
    saliency = np.zeros((n, *size), dtype=np.float32)
    k = min(saliency_top_k, n)
    if k > 0:
        best_label = probs.argmax(axis=1)
        slice_score = probs.max(axis=1)
        # Stable sort: equal scores keep slice order, so the choice is reproducible.
        top = np.argsort(-slice_score, kind="stable")[:k]

        def explain(part: slice) -> np.ndarray:
            idx = top[part]
            if runtime.has_cam:
                _, cam = runtime.forward(x[idx])
                assert cam is not None
                return cam_saliency(cam, best_label[idx].tolist(), size)
            assert network is not None and layer is not None
            batch = torch.from_numpy(x[idx]).to(runtime.device)
            return grad_cam(network, layer, batch, best_label[idx].tolist())

        cams = np.concatenate(run_batched(k, batch_size, runtime.device, explain))
        saliency[top] = cams * slice_score[top, None, None]
    return Prediction(probs, saliency)


def aggregate_study(
    probabilities: np.ndarray, method: Literal["max", "top_k_mean"] = "max", k: int = 3
) -> np.ndarray:
    """Study probability per label from slice probabilities (n, n_labels).

    "max" is the default: a 7 mm nodule on 5 mm slices shows on one or two
    slices only, and a mean over more slices would dilute it. "top_k_mean"
    trades some of that sensitivity for fewer false alarms from a single
    noisy slice on thin-slice series, where a real nodule spans >= k slices.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError("need slice probabilities of shape (n >= 1, n_labels)")
    if method == "max":
        return p.max(axis=0)
    if method == "top_k_mean":
        kk = max(1, min(k, p.shape[0]))
        return np.sort(p, axis=0)[-kk:].mean(axis=0)
    raise ValueError(f"unknown aggregation {method!r}")
