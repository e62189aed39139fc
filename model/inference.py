"""Running a loaded network on preprocessed slices.

The forward pass runs batched under `torch.inference_mode` (no autograd
bookkeeping), with float16 autocast on CUDA only: CPU autocast is bfloat16,
slower than float32 on most CPUs and lossier. A CUDA out-of-memory error (a
busy shared GPU, a large series) halves the batch and retries, down to one
slice, rather than failing the study.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from model.saliency import grad_cam, target_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Per-slice outputs for one series.

    `probabilities` (n, n_labels) float32. `saliency` (n, h, w) float32 in
    [0, 1]: Grad-CAM on the `top_k` most suspicious slices, each map scaled to
    peak at that slice's probability so a faint map means weak evidence;
    zeros elsewhere. None when saliency was not asked for, or the network
    (TorchScript) cannot be explained.
    """

    probabilities: np.ndarray
    saliency: np.ndarray | None


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


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


def forward_logits(
    network: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """Logits (n, n_out) float32, batched; halves the batch on CUDA out-of-memory."""

    def step(part: slice) -> np.ndarray:
        with torch.inference_mode(), _autocast(device):
            batch = torch.from_numpy(x[part]).to(device)
            return network(batch).float().cpu().numpy()

    out = run_batched(x.shape[0], batch_size, device, step)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def probabilities(
    network: nn.Module, x: np.ndarray, *, device: torch.device, n_labels: int, batch_size: int
) -> np.ndarray:
    """Sigmoid of the logits (n, n_labels) of batch-shaped input (see `as_batch`)."""
    logits = forward_logits(network, x, device, batch_size)
    if logits.shape[1] != n_labels:
        raise ValueError(f"network gives {logits.shape[1]} outputs, manifest has {n_labels} labels")
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


def predict(
    network: nn.Module,
    slices: np.ndarray,
    *,
    device: torch.device,
    channels: int,
    size: tuple[int, int],
    n_labels: int,
    batch_size: int = 32,
    saliency_top_k: int = 8,
    with_saliency: bool = True,
    known: np.ndarray | None = None,
) -> Prediction:
    """Probabilities (sigmoid of the logits: one independent output per label) and Grad-CAM.

    `known`: the slices' probabilities, computed earlier by `probabilities`
    (slice by slice as the images arrived); only the saliency is computed here.
    """
    x = as_batch(slices, channels, size)
    n = x.shape[0]
    if n == 0:
        sal = np.zeros((0, *size), dtype=np.float32) if with_saliency else None
        return Prediction(np.zeros((0, n_labels), dtype=np.float32), sal)
    if known is None:
        probs = probabilities(network, x, device=device, n_labels=n_labels, batch_size=batch_size)
    else:
        probs = np.asarray(known, dtype=np.float32)
        if probs.shape != (n, n_labels):
            raise ValueError(
                f"known probabilities of shape {probs.shape}, expected {(n, n_labels)}"
            )
    if not with_saliency:
        return Prediction(probs, None)
    layer = target_layer(network)
    if layer is None:
        log.debug("no layer to explain (TorchScript?): no saliency")
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
            batch = torch.from_numpy(x[idx]).to(device)
            return grad_cam(network, layer, batch, best_label[idx].tolist())

        cams = np.concatenate(run_batched(k, batch_size, device, explain))
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
