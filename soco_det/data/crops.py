"""Crop parameters of the views: the whole image, or a RandomResizedCrop of the original image.

A crop is ``(top, left, height, width)`` in original-image pixels (integers), as in torchvision's
``RandomResizedCrop.get_params`` (v1 semantics, which the official code copies): up to
``attempts`` draws of an area fraction ``U(scale)`` and a log-uniform aspect ratio, rounded to
integers and accepted when they fit; otherwise a centre crop with the aspect ratio clamped into
``ratio``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from soco_det.data.boxes import Crop


def whole_image(width: int, height: int) -> Crop:
    return (0, 0, height, width)


def random_resized_crop(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    attempts: int,
    rng: np.random.Generator,
) -> Crop:
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w)


# The smallest object region, in original-image pixels (also the smallest image data.min_side allows).
MIN_REGION_SIDE = 32


def object_region(width: int, height: int, box: np.ndarray, box_side: float, rng: np.random.Generator) -> Crop | None:
    """The object region around ``box`` that stands in for the whole image with
    ``geometry.fit_objects`` (docs/method.md 2.9), or ``None`` when it would be the whole image
    (nothing is drawn then).

    ``box``: float64 ``[4]`` ``x1, y1, x2, y2`` in original-image pixels. The region is a square of
    side ``sqrt(w * h) / box_side`` (at least ``MIN_REGION_SIDE``), cut to the image's width and
    height, placed so that the box's centre lands in its middle half (then clamped into the image).
    """
    area = max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
    side = int(round(max(float(np.sqrt(area)) / box_side, MIN_REGION_SIDE)))
    w, h = min(side, width), min(side, height)
    if w >= width and h >= height:
        return None
    u = rng.uniform(0.25, 0.75, size=2)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    left = int(min(max(round(cx - u[0] * w), 0), width - w))
    top = int(min(max(round(cy - u[1] * h), 0), height - h))
    return (top, left, h, w)
