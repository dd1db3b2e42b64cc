"""The R-CNN box head "4conv1fc" (detectron2's ``FastRCNNConvFCHead`` with norm, docs/method.md 3.4).

Pretraining this head is what lets SoCo transfer more than a backbone: the detectron2 and mmdet
exporters rename ``conv{k}``/``bn{k}``/``fc1`` into the detector's box head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvFCHead(nn.Module):
    """``num_convs`` x [3x3 conv (no bias) -> BN -> ReLU], flatten, ``fc1`` -> ReLU.

    Input: RoI features ``[N, in_channels, roi_size, roi_size]``.
    Output: ``[N, fc_dim]`` (non-negative, after the ReLU).
    Names ``conv1..convK``, ``bn1..bnK``, ``fc1``; PyTorch's default initialisation (official).
    """

    def __init__(
        self, in_channels: int = 256, conv_dim: int = 256, fc_dim: int = 1024, roi_size: int = 7, num_convs: int = 4
    ) -> None:
        super().__init__()
        self.num_convs = num_convs
        channels = in_channels
        for k in range(1, num_convs + 1):
            self.add_module(f"conv{k}", nn.Conv2d(channels, conv_dim, 3, padding=1, bias=False))
            self.add_module(f"bn{k}", nn.BatchNorm2d(conv_dim))
            channels = conv_dim
        self.fc1 = nn.Linear(channels * roi_size * roi_size, fc_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(1, self.num_convs + 1):
            x = F.relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
        return F.relu(self.fc1(torch.flatten(x, 1)))
