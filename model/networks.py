"""Network architectures that a manifest can name as "model.networks:Class".

Only what the built-in models need: a small 2D slice classifier. Models made
elsewhere can ship as TorchScript instead and need no class here.
"""

from __future__ import annotations

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
    """Conv blocks, global average pooling, one linear layer: a logit per label.

    A strided stem halves the 128x128 input first: the 2-core CPUs this must
    train on cannot afford full-resolution convolutions, and a nodule of >= 7 mm
    is still >= 2 pixels wide at 64x64 over a 360 mm field of view.

    The last block does not pool, so `features` (its output) keeps a 16x16
    map for 128x128 inputs: the layer Grad-CAM explains.
    """

    def __init__(
        self, in_channels: int = 1, n_labels: int = 1, width: int = 16, n_blocks: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        c = width
        for i in range(n_blocks):
            c_out = width * 2 ** (i + 1)
            blocks.append(_ConvBlock(c, c_out, pool=i < n_blocks - 1))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(c, n_labels)

    @property
    def features(self) -> nn.Module:
        """The last convolutional block, whose activations Grad-CAM weighs."""
        return self.blocks[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.blocks(self.stem(x))
        return self.head(self.dropout(f.mean(dim=(2, 3))))
