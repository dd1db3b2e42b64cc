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
