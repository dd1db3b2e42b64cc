"""RoIAlign of normalised view boxes on one feature map, and the two level modes of SoCo.

Box scaling (docs/method.md 9.5-9.6). Boxes arrive as ``[x1, y1, x2, y2]`` normalised to the view.

* default (continuous): ``x_feat = x * W_view / stride`` (and ``y`` with ``H_view``). A box edge
  at continuous pixel ``u`` lies at ``u / stride`` in the grid of a stride-``stride`` map whose cell
  ``j`` covers pixels ``[j*stride, (j+1)*stride)``: the convention ``aligned=True`` assumes. This
  stays right when the view side is not a multiple of the stride (a 112-px view has a 4x4 P5
  covering 128 px).
* legacy (official): ``x_feat = x * W_feat``, scaling by the feature-map size; equal to the default
  when ``W_view`` is a multiple of ``stride``.

RoIAlign always runs in fp32 (features are cast up, under autocast too), as the official code does (docs/method.md 3.3)
and docs/method.md 9.14 recommends: box coordinates of a few hundred pixels have only ~3 significant
digits in half precision.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import roi_align


def scale_boxes(
    boxes: torch.Tensor, view_size: tuple[int, int], feat_size: tuple[int, int], stride: float, legacy: bool = False
) -> torch.Tensor:
    """Normalised boxes ``[..., 4]`` -> float32 boxes in the feature map's grid.

    ``view_size`` and ``feat_size`` are ``(H, W)`` in pixels and cells.
    """
    if legacy:
        sy, sx = float(feat_size[0]), float(feat_size[1])
    else:
        sy, sx = view_size[0] / stride, view_size[1] / stride
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=boxes.device)
    return boxes.to(torch.float32) * scale


def roi_align_boxes(
    feature: torch.Tensor,
    boxes: torch.Tensor,
    view_size: tuple[int, int],
    stride: float,
    output_size: int,
    legacy: bool = False,
    batch_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoIAlign (``aligned=True``, adaptive sampling) of normalised boxes, in fp32.

    Args:
        feature: ``[B, C, H_f, W_f]`` map of stride ``stride`` of a view of ``view_size`` (H, W) px.
        boxes: ``[B, N, 4]`` normalised ``x1, y1, x2, y2`` (box ``n`` of image ``b``), or ``[R, 4]``
            together with ``batch_index`` ``[R]`` (int64) naming each box's image.
    Returns:
        float32 ``[B*N, C, output_size, output_size]`` in row order ``b*N + n`` (or ``[R, ...]``).
    """
    if batch_index is None:
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [B, N, 4], got {tuple(boxes.shape)}")
        if boxes.shape[0] != feature.shape[0]:
            raise ValueError(f"boxes hold {boxes.shape[0]} images but the feature map {feature.shape[0]}")
        b, n = boxes.shape[:2]
        batch_index = torch.arange(b, device=boxes.device).repeat_interleave(n)
        boxes = boxes.reshape(b * n, 4)
    scaled = scale_boxes(boxes, view_size, tuple(feature.shape[-2:]), stride, legacy)
    rois = torch.cat([batch_index.to(torch.float32)[:, None], scaled], dim=1)
    # Explicit fp32: the official code casts the map to the boxes' dtype for the same reason.
    return roi_align(
        feature.float(),
        rois,
        output_size=(output_size, output_size),
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )


def pool_assigned_level(
    features: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    levels: torch.Tensor,
    view_size: tuple[int, int],
    strides: Sequence[float],
    output_size: int,
    legacy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool each box only on its assigned level (``assigned_level`` mode).

    Args:
        features: P maps ``[B, C, H_p, W_p]``; boxes ``[B, K, 4]`` normalised; levels int64
            ``[B, K]`` in ``0..P-1``, ``-1`` (unassigned: not pooled, it cannot match anything).
    Returns:
        ``(rois, image, row)``: float32 ``[R, C, s, s]`` pooled features, int64 ``[R]`` image index
        and int64 ``[R]`` row ``p*K + i`` in the level-major ``[B, P*K]`` layout of ``corr``.
    """
    k = boxes.shape[1]
    pooled, images, rows = [], [], []
    for p, (feature, stride) in enumerate(zip(features, strides)):
        image, box = torch.nonzero(levels == p, as_tuple=True)
        pooled.append(roi_align_boxes(feature, boxes[image, box], view_size, stride, output_size, legacy, image))
        images.append(image)
        rows.append(p * k + box)
    return torch.cat(pooled), torch.cat(images), torch.cat(rows)
