"""ResNet trunk (torchvision layout) returning C2..C5, or C4 only for the C4 variant.

The module keeps torchvision's names (``conv1``, ``bn1``, ``layer1``..``layer4``) and drops
``avgpool`` and ``fc``, so its state dict is exactly ``torchvision.models.resnetNN().state_dict()``
minus ``fc.*``: exporters to torchvision, timm, mmdet and detectron2 rename from these names.
The stride sits in the 3x3 conv ("ResNet v1.5"), as in the official code (docs/method.md 3.1).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

_BUILDERS = {
    18: tv_resnet.resnet18,
    34: tv_resnet.resnet34,
    50: tv_resnet.resnet50,
    101: tv_resnet.resnet101,
}

# Channels of C2..C5 for each block type.
_BASIC_CHANNELS = (64, 128, 256, 512)
_BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)


def stage_channels(depth: int) -> tuple[int, int, int, int]:
    """Output channels of C2, C3, C4, C5 of ResNet-``depth``."""
    if depth not in _BUILDERS:
        raise ValueError(f"ResNet depth must be one of {sorted(_BUILDERS)}, got {depth}")
    return _BASIC_CHANNELS if depth < 50 else _BOTTLENECK_CHANNELS


class ResNetTrunk(nn.Module):
    """ResNet without its classifier.

    ``forward(x)`` with ``x`` float ``[B, 3, H, W]`` returns:

    * ``out="c2c5"``: the tuple ``(C2, C3, C4, C5)`` at strides 4, 8, 16, 32;
    * ``out="c4"``: ``C4`` ``[B, C, ceil(H/16), ceil(W/16)]`` only; ``layer4`` is still a
      submodule (the C4 model runs it on RoI features, like detectron2's ``Res5ROIHeads``).

    Initialisation is the official one (docs/method.md 3.1): convs ``N(0, sqrt(2 / (k*k*C_out)))``,
    BN ``gamma=1, beta=0``, and with ``zero_init_residual`` the last BN gamma of every residual
    block (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock) is 0, so each block starts as identity.
    """

    def __init__(self, depth: int = 50, out: str = "c2c5", zero_init_residual: bool = True) -> None:
        super().__init__()
        if out not in ("c2c5", "c4"):
            raise ValueError(f"out must be 'c2c5' or 'c4', got {out!r}")
        self.depth = depth
        self.out = out
        self.channels = stage_channels(depth)
        net = _BUILDERS[depth](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.reset_parameters(zero_init_residual)

    @torch.no_grad()
    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
        if zero_init_residual:
            for m in self.modules():
                last_bn = (
                    getattr(m, "bn3", None)
                    if isinstance(m, tv_resnet.Bottleneck)
                    else (getattr(m, "bn2", None) if isinstance(m, tv_resnet.BasicBlock) else None)
                )
                if last_bn is not None:
                    last_bn.weight.zero_()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        if self.out == "c4":
            return c4
        return c2, c3, c4, self.layer4(c4)
