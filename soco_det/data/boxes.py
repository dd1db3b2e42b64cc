"""Box geometry of the view sampler, vectorised over boxes (numpy).

Two conventions (docs/architecture.md, docs/method.md 1.4, 2.4, 9.5):

* **continuous** (default): a box is ``[x1, y1, x2, y2]`` in continuous pixel coordinates, pixel
  ``i`` covering ``[i, i + 1)``. A store rect ``(x, y, w, h)`` (official selective-search
  convention, ``w = max_x - min_x``) covers pixels ``x..x+w`` and becomes ``[x, y, x+w+1, y+h+1]``;
  a crop ``(top, left, h, w)`` is ``[left, top, left+w, top+h]``; the whole image is ``[0, 0, W, H]``.
  Normalising divides by the crop size, so a box covering the whole view is ``[0, 0, 1, 1]`` and a
  horizontal flip ``x -> 1 - x`` is exact. Box sizes for level assignment are ``sqrt(w * h)`` of the
  box in the view's pixel grid (floats).
* **legacy** (``legacy=True``, the official code, off-by-ones included): ``x2 = x + w - 1``
  (inclusive index, one pixel short of the region); a crop is ``[left, top, left+w-1, top+h-1]``;
  the whole-image fallback is ``[0, 0, W-1, H-1]``; normalising divides inclusive indices by the crop
  size (a full-width box ends at ``(w-1)/w``); the flip is ``1 - x``; jitter uses ``w = x2-x1+1``;
  level sizes are ``sqrt((x2-x1+1)(y2-y1+1))`` of the int-truncated resized boxes.

In both, "overlap" is the official strict test ``a.x1 < b.x2 and b.x1 < a.x2`` (and the same in y),
i.e. a positive-area intersection in the continuous convention.

All arrays are float64 ``[n, 4]`` unless stated; ids are int64 ``[n]``.
"""

from __future__ import annotations

import numpy as np

Crop = tuple[int, int, int, int]  # (top, left, height, width) in original-image pixels


def rects_to_boxes(rects: np.ndarray, legacy: bool = False) -> np.ndarray:
    """Store rects ``int [n, 4] (x, y, w, h)`` -> boxes ``float64 [n, 4] (x1, y1, x2, y2)``."""
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    end = -1.0 if legacy else 1.0
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:] + end], axis=1)


def whole_image_box(width: int, height: int, legacy: bool = False) -> np.ndarray:
    """The single whole-image proposal ``[1, 4]`` used when an image has none (docs/method.md 1.3)."""
    end = -1.0 if legacy else 0.0
    return np.array([[0.0, 0.0, width + end, height + end]])


def crop_box(crop: Crop, legacy: bool = False) -> np.ndarray:
    """A crop ``(top, left, h, w)`` as a box ``float64 [4]`` in original-image coordinates."""
    top, left, h, w = crop
    end = -1.0 if legacy else 0.0
    return np.array([left, top, left + w + end, top + h + end], dtype=np.float64)


def overlaps(boxes: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``bool [n]``: box i strictly overlaps ``region [4]`` (positive-area intersection)."""
    return (region[0] < boxes[:, 2]) & (boxes[:, 0] < region[2]) & (region[1] < boxes[:, 3]) & (boxes[:, 1] < region[3])


def clip_to_crop(boxes: np.ndarray, ids: np.ndarray, crop: Crop, legacy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Boxes that overlap the crop, intersected with it, in crop-local pixel coordinates.

    Returns ``(boxes [m, 4], ids [m])`` with ``m <= n``; boxes that do not overlap are dropped.
    """
    region = crop_box(crop, legacy)
    keep = overlaps(boxes, region)
    kept = boxes[keep]
    out = np.empty_like(kept)
    out[:, :2] = np.maximum(kept[:, :2], region[:2]) - region[:2]
    out[:, 2:] = np.minimum(kept[:, 2:], region[2:]) - region[:2]
    return out, np.asarray(ids)[keep]


def jitter(boxes: np.ndarray, rng: np.random.Generator, prob: float, ratio: float, legacy: bool = False) -> np.ndarray:
    """Random box jitter (docs/method.md 2.3): with probability ``prob`` per box, ``j ~ U(-r, r)^4`` and
    ``x1' = x1 + j0 w``, ``y1' = y1 + j1 h``, ``w' = w (1 + j2)``, ``h' = h (1 + j3)``.

    ``w = x2 - x1`` (continuous) or ``x2 - x1 + 1`` (legacy, with ``x2' = x1' + w' - 1``).
    """
    boxes = np.array(boxes, dtype=np.float64, copy=True)
    n = boxes.shape[0]
    apply = rng.random(n) < prob
    j = rng.uniform(-ratio, ratio, size=(n, 4))
    if not apply.any():
        return boxes
    one = 1.0 if legacy else 0.0
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    x1 = boxes[:, 0] + j[:, 0] * w
    y1 = boxes[:, 1] + j[:, 1] * h
    jittered = np.stack([x1, y1, x1 + w * (1 + j[:, 2]) - one, y1 + h * (1 + j[:, 3]) - one], axis=1)
    boxes[apply] = jittered[apply]
    return boxes


def normalise(local_boxes: np.ndarray, crop: Crop) -> np.ndarray:
    """Crop-local pixel boxes -> boxes normalised by the crop's width and height."""
    _, _, h, w = crop
    return local_boxes / np.array([w, h, w, h], dtype=np.float64)


def hflip(norm_boxes: np.ndarray) -> np.ndarray:
    """Horizontal flip of normalised boxes: ``x1' = 1 - x2``, ``x2' = 1 - x1``."""
    out = norm_boxes.copy()
    out[:, 0] = 1.0 - norm_boxes[:, 2]
    out[:, 2] = 1.0 - norm_boxes[:, 0]
    return out


def view_pixel_boxes(local_boxes: np.ndarray, crop: Crop, size: int, legacy: bool = False) -> np.ndarray:
    """Crop-local boxes in the view's pixel grid (``size x size``), before any flip.

    Legacy: the official ``resize_bboxs(...).astype(int)``, truncated inclusive indices.
    """
    _, _, h, w = crop
    # (x / w) * size, in the official order of operations, so truncation matches bit for bit.
    out = local_boxes / np.array([w, h, w, h], dtype=np.float64) * size
    return np.trunc(out) if legacy else out


def box_sizes(view_boxes: np.ndarray, legacy: bool = False) -> np.ndarray:
    """``float64 [n]`` sqrt area of view-pixel boxes (legacy: inclusive ``+1`` widths)."""
    one = 1.0 if legacy else 0.0
    return np.sqrt((view_boxes[:, 2] - view_boxes[:, 0] + one) * (view_boxes[:, 3] - view_boxes[:, 1] + one))


def to_original(norm_boxes: np.ndarray, crop: Crop, flipped: bool) -> np.ndarray:
    """Inverse map: normalised (possibly flipped) view boxes -> original-image coordinates."""
    top, left, h, w = crop
    boxes = hflip(norm_boxes) if flipped else norm_boxes
    return boxes * np.array([w, h, w, h]) + np.array([left, top, left, top])
