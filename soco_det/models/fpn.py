"""Feature pyramid P2..P5 as in the official SoCo neck (mmdet FPN with BN, docs/method.md 3.2).

Names follow mmdet/mmcv (``lateral_convs.{i}.conv`` / ``.bn``, ``fpn_convs.{i}.conv`` / ``.bn``)
so checkpoints convert to mmdet unchanged and to detectron2 by a fixed rename
(``fpn_lateral{i+2}``, ``fpn_output{i+2}``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBN(nn.Module):
    """``Conv2d`` (no bias: the BN that follows has one) then ``BatchNorm2d``, no activation.

    Initialised as mmcv's ``ConvModule``: Kaiming-normal conv weights (fan_out, ReLU gain),
    BN ``gamma=1, beta=0``. (The official ``FPN.init_weights`` with Xavier is never called.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class FPN(nn.Module):
    """Top-down pyramid over ``C2..C5``.

    ``forward(feats)`` takes the backbone's ``(C2, C3, C4, C5)`` and returns ``[P2, P3, P4, P5]``,
    each ``[B, out_channels, H_l, W_l]`` at the resolution of its input level. Order of operations
    (official): 1x1 lateral conv+BN on every level; from the top, nearest-neighbour upsample to
    the lower lateral's size and add; then a 3x3 conv+BN on every summed map. No extra P6 level.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(ConvBN(c, out_channels, 1) for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(ConvBN(out_channels, out_channels, 3) for _ in self.in_channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} feature maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # Out of place: autograd needs the un-summed lateral of level i for the conv's backward.
            up = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + up
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
