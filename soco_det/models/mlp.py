"""BYOL projector / predictor MLP (docs/method.md 3.5).

Module names ``linear1``, ``bn1``, ``linear2`` are those of the official ``contrast/models/mlps.py``
``MLP``, so official checkpoints load into it without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``Linear(in_dim, hidden_dim) -> BatchNorm1d -> ReLU -> Linear(hidden_dim, out_dim)``.

    Input ``[N, in_dim]``, output ``[N, out_dim]`` (not normalised; the loss normalises).
    Projector: 1024 (FPN head) or 2048 (C4, image BYOL) -> 4096 -> 256; predictor: 256 -> 4096 -> 256.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.bn1(self.linear1(x))))
