"""Scale-aware FPN level assignment and the correspondence matrices (docs/method.md 2.7-2.8).

A box goes to the first level ``p`` whose threshold is at least its size
(``size <= thresholds[p]``; ``[48, 96, 192, 224]`` -> P2..P5), where size is ``sqrt(w * h)`` in
the pixel grid of the view it lives in (see :func:`soco_det.data.boxes.box_sizes` for the
continuous and legacy definitions). Boxes larger than the last threshold get ``-1`` (unassigned).
This is deliberately not detectron2's ``floor(4 + log2(sqrt(wh) / 224))`` rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def assign_levels(sizes: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
    """``int64`` level index per box (same shape as ``sizes``), ``-1`` above the last threshold.

    ``thresholds=None`` or empty means one level: every box is at level 0 (C4).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if not thresholds:
        return np.zeros(sizes.shape, dtype=np.int64)
    t = np.asarray(thresholds, dtype=np.float64)
    # searchsorted 'left' gives the first j with t[j] >= size, i.e. size <= t[j].
    level = np.searchsorted(t, sizes, side="left").astype(np.int64)
    level[level >= len(t)] = -1
    return level


def correspondence(
    ids_a: torch.Tensor, levels_a: torch.Tensor, ids_b: torch.Tensor, levels_b: torch.Tensor, num_levels: int
) -> torch.Tensor:
    """Level-aware correspondence matrix of a view pair.

    Args:
        ids_a, ids_b: int64 ``[..., K]`` proposal ids of the K box rows of views a and b.
        levels_a, levels_b: int64 ``[..., K]`` level index in ``0..P-1``, ``-1`` for unassigned.
        num_levels: P.

    Returns:
        float32 ``[..., P*K, P*K]``: entry ``(p*K + i, q*K + j)`` is 1 iff ``ids_a[i] == ids_b[j]``,
        ``levels_a[i] == p`` and ``levels_b[j] == q`` (same proposal, any pair of levels), else 0.
        Numpy inputs give a numpy result.
    """
    as_numpy = isinstance(ids_a, np.ndarray)
    ids_a, levels_a, ids_b, levels_b = (torch.as_tensor(x) for x in (ids_a, levels_a, ids_b, levels_b))
    k = ids_a.shape[-1]
    p_range = torch.arange(num_levels, device=ids_a.device)
    same = (ids_a[..., :, None] == ids_b[..., None, :]).float()  # [..., K, K]
    onehot_a = (levels_a[..., None] == p_range).float()  # [..., K, P]
    onehot_b = (levels_b[..., None] == p_range).float()
    # [..., P, K, Q, K]: box i of a at level p matches box j of b at level q.
    corr = onehot_a.transpose(-1, -2)[..., :, :, None, None] * same[..., None, :, None, :]
    corr = corr * onehot_b.transpose(-1, -2)[..., None, None, :, :]
    out = corr.reshape(*ids_a.shape[:-1], num_levels * k, num_levels * k)
    return out.numpy() if as_numpy else out
