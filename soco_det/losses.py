"""The SoCo object-level BYOL loss (docs/method.md 4, 9.21).

For one view pair (a, b) and image n, with ``p`` the online predictions of view a's box rows,
``z`` the target projections of view b's box rows (both L2-normalised) and ``C`` the 0/1
correspondence (rows of a, columns of b)::

    l(a->b) = -2 / N * sum_n [ sum_ij C_n[i,j] <p_n,i, z_n,j> / (sum_ij C_n[i,j] + 1e-6) ]

i.e. BYOL's ``2 - 2 cos`` without the constant, averaged over the matched (box, level) pairs of each
image, then over the images of the batch (an image without matches adds 0 but still counts in N).
The pair's term is ``l(a->b) + l(b->a)`` (the reverse uses ``C^T``) and the total sums the pairs, so
the minimum is ``-4`` per pair. Everything is computed in fp32, outside autocast.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_3d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 3-d tensor, got {shape}")


def directional_loss(pred: torch.Tensor, target: torch.Tensor, corr: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``l(a->b)``: float32 scalar.

    Args:
        pred: ``[B, M, D]`` online predictions of view a's rows (any float dtype; normalised here).
        target: ``[B, N, D]`` target projections of view b's rows (normalised here; no gradient
            is expected, but none is blocked either).
        corr: ``[B, M, N]`` correspondence weights (0/1 in SoCo): row ``i`` of a matches column ``j``.
        eps: added to each image's match count (official 1e-6).
    """
    _check_3d("pred", pred)
    _check_3d("target", target)
    _check_3d("corr", corr)
    b, m, d = pred.shape
    if target.shape[0] != b or target.shape[2] != d:
        raise ValueError(f"target {tuple(target.shape)} does not fit pred {tuple(pred.shape)} (need [B, N, D])")
    if tuple(corr.shape) != (b, m, target.shape[1]):
        raise ValueError(f"corr must be [B, M, N] = {[b, m, target.shape[1]]}, got {list(corr.shape)}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = F.normalize(pred.float(), dim=-1)
        z = F.normalize(target.float(), dim=-1)
        c = corr.float()
        cos = torch.bmm(p, z.transpose(1, 2))  # [B, M, N]
        per_image = (cos * c).sum(dim=(1, 2)) / (c.sum(dim=(1, 2)) + eps)
        return -2.0 * per_image.mean()


def byol_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Image-level BYOL term ``-2 * mean_n cos(pred_n, target_n)`` (float32 scalar); ``[B, D]`` each."""
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(f"pred and target must both be [B, D], got {tuple(pred.shape)} and {tuple(target.shape)}")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return -2.0 * F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def decorrelation_loss(segments: Sequence[torch.Tensor], eps: float = 1e-4) -> torch.Tensor:
    """Variance-covariance regulariser (VICReg's two terms) of feature channels: float32 scalar.

    Each segment ``[R_s, D]`` (one network call, whose BatchNorm statistics are its own) is centred
    over its own rows; with ``C`` the ``D x D`` covariance of all centred rows,
    ``relu(1 - sqrt(diag(C) + eps)).mean() + sum_{i != j} C_ij^2 / D``: 0 when every channel has
    a standard deviation of at least 1 and no two channels covary. It counters the dimensional
    collapse a BYOL-style loss alone allows at small batch and budget, where a few directions come to
    carry all the variance (``model.head_decorrelation``; an option, not in the paper). Segments of
    one row are skipped.
    """
    parts = []
    with torch.autocast(device_type=segments[0].device.type, enabled=False):
        for x in segments:
            if x.shape[0] < 2:
                continue
            x = x.float()
            parts.append(x - x.mean(0))
        if not parts:
            return segments[0].new_zeros((), dtype=torch.float32)
        z = torch.cat(parts)
        cov = z.T @ z / (z.shape[0] - 1)
        variance = F.relu(1 - torch.sqrt(cov.diagonal() + eps)).mean()
        covariance = (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / cov.shape[0]
        return variance + covariance


def pair_name(a: int, b: int) -> str:
    """``"1-2"`` for views 0 and 1: the 1-based view numbers used in logs and metrics."""
    return f"{a + 1}-{b + 1}"


class SoCoLoss(nn.Module):
    """Symmetrised SoCo loss summed over view pairs.

    ``forward(pairs, preds, targets, corrs)``:

    * ``pairs``: ``[(a, b), ...]`` 0-based view indices;
    * ``preds[k]``: ``(p_a, p_b)`` online predictions ``[B, M, D]`` of pair k's box rows in a and b;
    * ``targets[k]``: ``(z_a, z_b)`` target projections ``[B, M, D]``;
    * ``corrs[k]``: ``[B, M, M]`` correspondence of pair k (rows a, columns b).

    Returns ``{"loss": float32 scalar, "pair_losses": {"1-2": l(1->2), "2-1": l(2->1), ...}}``.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps

    def forward(
        self,
        pairs: Sequence[tuple[int, int]],
        preds: Sequence[tuple[torch.Tensor, torch.Tensor]],
        targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        corrs: Sequence[torch.Tensor],
    ) -> dict:
        if not pairs:
            raise ValueError("SoCoLoss needs at least one view pair")
        if not (len(pairs) == len(preds) == len(targets) == len(corrs)):
            raise ValueError(
                f"one entry per pair expected: {len(pairs)} pairs, {len(preds)} preds, "
                f"{len(targets)} targets, {len(corrs)} corrs"
            )
        pair_losses: dict[str, torch.Tensor] = {}
        for (a, b), (p_a, p_b), (z_a, z_b), corr in zip(pairs, preds, targets, corrs):
            if a == b or pair_name(a, b) in pair_losses:
                raise ValueError(f"view pairs must be distinct pairs of different views, got {list(pairs)}")
            pair_losses[pair_name(a, b)] = directional_loss(p_a, z_b, corr, self.eps)
            pair_losses[pair_name(b, a)] = directional_loss(p_b, z_a, corr.transpose(1, 2), self.eps)
        return {"loss": torch.stack(list(pair_losses.values())).sum(), "pair_losses": pair_losses}


def nt_xent_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent over ``M`` positive pairs: ``(l(a), l(b))``, float32 scalars.

    ``a[i]`` and ``b[i]`` (``[M, D]`` each, normalised here) are the two views of one object; every
    other row of ``a`` and ``b`` is a negative of both. With ``s = cos / temperature`` over the
    ``2M`` rows (self-similarity excluded), ``l(a)`` is the mean over the rows of ``a`` of
    ``-log softmax(s)[a_i -> b_i]`` and ``l(b)`` the same for the rows of ``b``; SimCLR's (and
    lightly's ``NTXentLoss``) value is ``(l(a) + l(b)) / 2``. Computed in fp32 outside autocast.
    The DetCon baseline's loss (docs/benchmarks.md, "DetCon baseline").
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    m = a.shape[0]
    with torch.autocast(device_type=a.device.type, enabled=False):
        z = F.normalize(torch.cat([a, b]).float(), dim=-1)
        sim = z @ z.T / temperature
        sim = sim.masked_fill(torch.eye(2 * m, dtype=torch.bool, device=z.device), float("-inf"))
        positive = torch.cat([torch.arange(m, 2 * m), torch.arange(m)]).to(z.device)
        ce = F.cross_entropy(sim, positive, reduction="none")
        return ce[:m].mean(), ce[m:].mean()
