"""Object masks from boxes and mask pooling, for the DetCon baseline (variant ``detcon``).

DetCon (Hénaff et al. 2021) averages the backbone's last feature map over each object's mask. Our
objects are the proposal boxes the view sampler already tracks across views, so a box becomes a
soft mask on the feature grid: the weight of a cell is the fraction of it the box covers (the
average of the box's binary pixel mask over the cell), and pooling is the mask-weighted mean.
"""

from __future__ import annotations

import torch


def _coverage(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
    """``[..., cells]``: fraction of each of ``cells`` equal cells of ``[0, 1]`` inside ``[lo, hi]``."""
    edges = torch.arange(cells + 1, device=lo.device, dtype=lo.dtype) / cells
    inside = torch.minimum(hi[..., None], edges[1:]) - torch.maximum(lo[..., None], edges[:-1])
    return inside.clamp(min=0) * cells


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Soft masks ``[B, K, height, width]`` of boxes ``[B, K, 4]`` (``x1, y1, x2, y2`` normalised to
    the view, the batch layout of docs/architecture.md) on a ``height x width`` feature grid."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, K, 4], got {tuple(boxes.shape)}")
    b = boxes.float().clamp(0, 1)
    cols = _coverage(b[..., 0], b[..., 2], width)  # [B, K, W]
    rows = _coverage(b[..., 1], b[..., 3], height)  # [B, K, H]
    return rows[..., :, None] * cols[..., None, :]


def mask_pool(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[B, K, C]``: the mean of ``features`` ``[B, C, H, W]`` over each mask ``[B, K, H, W]``
    (weights in [0, 1]); an empty mask gives zeros."""
    if features.dim() != 4 or masks.dim() != 4 or features.shape[0] != masks.shape[0]:
        raise ValueError(
            f"features [B, C, H, W] and masks [B, K, H, W] do not fit: {tuple(features.shape)}, {tuple(masks.shape)}"
        )
    if features.shape[2:] != masks.shape[2:]:
        raise ValueError(f"masks are {tuple(masks.shape[2:])}, features {tuple(features.shape[2:])}")
    m = masks.to(features.dtype)
    total = torch.einsum("bkhw,bchw->bkc", m, features)
    return total / (m.sum(dim=(2, 3))[..., None] + eps)
