"""Tiles of one labeled image as COCO records: pixel values to 8 bits, tile origins, and the
instances of a label image inside a tile.

A label image holds one integer per pixel: 0 is background, every other value one object. An
object inside a tile becomes one COCO annotation: its mask (the tile's pixels with that value) as a
compressed RLE from :mod:`pycocotools.mask`, ``bbox`` the mask's extent ``[x, y, w, h]`` in
continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``), ``area`` its pixel count. Objects
cut by the tile's border keep their visible part; parts under ``min_area`` pixels are dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_uint8(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """``image`` (any numeric 2-D array) stretched to ``uint8``: the ``low`` and ``high`` percentiles
    of the whole image map to 0 and 255, values outside are clipped (the same for every tile)."""
    values = image.astype(np.float64)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip(np.round((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def tile_origins(region: tuple[int, int, int, int], tile: int, stride: int) -> list[tuple[int, int]]:
    """``(x, y)`` top-left corners of the ``tile`` x ``tile`` tiles inside ``region = (x0, y0, x1,
    y1)`` (end exclusive), ``stride`` apart, row by row; a region smaller than one tile has none."""
    x0, y0, x1, y1 = region
    return [(x, y) for y in range(y0, y1 - tile + 1, stride) for x in range(x0, x1 - tile + 1, stride)]


def instance_annotations(labels: np.ndarray, min_area: int = 1) -> list[dict[str, Any]]:
    """COCO annotations (``category_id`` 1, without ``id`` / ``image_id``) of the objects of the 2-D
    label image ``labels``, in increasing label order; each carries its ``label`` value."""
    from pycocotools import mask as mask_utils

    height, width = labels.shape
    annotations = []
    for value in np.unique(labels):
        if value == 0:
            continue
        rle = mask_utils.encode(np.asfortranarray(labels == value, dtype=np.uint8))
        area = float(mask_utils.area(rle))
        if area < min_area:
            continue
        annotations.append(
            {
                "category_id": 1,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": area,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "iscrowd": 0,
                "label": int(value),
            }
        )
    return annotations
