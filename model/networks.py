"""Network architectures that a manifest can name as "model.networks:Class".

Only what the built-in models need: a small 2D slice classifier. Models made
elsewhere can ship as TorchScript instead and need no class here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),  # bias is BatchNorm's job
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class SliceClassifier(nn.Module):
    """Conv blocks, a 1x1 convolution to a logit map per label, log-sum-exp pooling.

    A nodule is small and local, so the network scores every location of a
    16x16 map (for 128x128 inputs) and pools with log-sum-exp, a smooth
    maximum: one suspicious spot is enough for a positive slice, and
    averaging (as global average pooling would) cannot dilute it. It also
    keeps the evidence where it is, which is what Grad-CAM then shows.
    `lse_r` sets the sharpness: large is max pooling, small is averaging.

    A strided stem halves the input first: the 2-core CPUs this must train
    on cannot afford full-resolution convolutions, and a nodule of >= 7 mm is
    still >= 2 pixels wide at 64x64 over a 360 mm field of view.
    """

    def __init__(
        self, in_channels: int = 1, n_labels: int = 1, width: int = 12, n_blocks: int = 3,
        lse_r: float = 4.0,
    ) -> None:
        super().__init__()
        self.lse_r = float(lse_r)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        c = width
        for i in range(n_blocks):
            c_out = width * 2 ** (i + 1)
            # The last block does not pool: its output is the map Grad-CAM explains.
            blocks.append(_ConvBlock(c, c_out, pool=i < n_blocks - 1))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Conv2d(c, n_labels, 1)

    @property
    def features(self) -> nn.Module:
        """The last convolutional block, whose activations Grad-CAM weighs."""
        return self.blocks[-1]

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location logits (n, n_labels, h', w')."""
        return self.head(self.dropout(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.logit_map(x).flatten(2)
        r = self.lse_r
        # log(mean(exp(r * m))) / r, written with logsumexp to stay finite.
        return (torch.logsumexp(r * m, dim=2) - math.log(m.shape[2])) / r


class WithCam(nn.Module):
    """A `SliceClassifier` that also returns its class-activation map: what an export carries.

    Its logit for label l pools, by log-sum-exp, the map of a 1x1 convolution
    over the last block's output. The gradient of that logit with respect to
    channel c of the block at any location is the head's weight w[l, c] times
    a softmax weight, and the softmax weights sum to 1 over the locations: so
    Grad-CAM's channel weights are w[l, c] / (h' w'), and its map is the
    head's map less its bias, up to a positive factor that Grad-CAM's peak
    normalisation removes. A runtime with no autograd (ONNX Runtime,
    TorchScript) then shows the saliency Grad-CAM shows in torch.
    Outputs: logits (n, labels) and the map (n, labels, h', w').
    """

    def __init__(self, network: SliceClassifier) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.network
        m = net.logit_map(x)
        flat = m.flatten(2)
        logits = (torch.logsumexp(net.lse_r * flat, dim=2) - math.log(flat.shape[2])) / net.lse_r
        bias = net.head.bias
        cam = m if bias is None else m - bias[None, :, None, None]
        return logits, cam
