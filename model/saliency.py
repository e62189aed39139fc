"""Grad-CAM: where on a slice the network's evidence for a label lies.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a convolutional
layer by the mean gradient of the label's logit with respect to it. It needs
one backward pass, so it runs outside `torch.inference_mode` and only on the
few slices a reader will look at.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def target_layer(network: nn.Module) -> nn.Module | None:
    """The layer to explain: `network.features` if the network names one, else its last Conv2d.

    None for TorchScript modules, which take no Python hooks.
    """
    if isinstance(network, torch.jit.ScriptModule):
        return None
    features = getattr(network, "features", None)
    if isinstance(features, nn.Module):
        return features
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def grad_cam(
    network: nn.Module, layer: nn.Module, x: torch.Tensor, labels: Sequence[int]
) -> np.ndarray:
    """Grad-CAM maps (k, h, w) float32 in [0, 1] for input x (k, c, h, w), one label per slice.

    Each map is scaled so that its maximum is 1 (all zeros where the layer
    holds no positive evidence). The network must be in eval mode: BatchNorm
    then treats slices independently, so one batched backward pass gives
    each slice its own gradients.
    """
    if x.shape[0] != len(labels):
        raise ValueError(f"{x.shape[0]} slices but {len(labels)} labels")
    if x.shape[0] == 0:
        return np.zeros((0, *x.shape[2:]), dtype=np.float32)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Input requires grad so the graph exists even with frozen weights.
            logits = network(x.detach().clone().requires_grad_(True))
            index = torch.as_tensor(list(labels), device=logits.device)
            score = logits.gather(1, index[:, None]).sum()
            (grads,) = torch.autograd.grad(score, captured[-1])
    finally:
        handle.remove()
    acts = captured[-1].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True)).float()
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)
