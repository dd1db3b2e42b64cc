"""Photometric augmentations of the views (BYOL-style asymmetric, docs/method.md 2.5) and cutout (2.6).

Same semantics as the official torchvision-v1 / PIL composition, without its per-op overhead (the
PIL composition itself, the reference these are tested against, is ``tests/_photometric_reference.py``):

* ColorJitter(b, c, s, h) with probability ``color_jitter_prob``: the four adjustments in a random
  order, factors ``U(max(0, 1-b), 1+b)`` etc. and hue shift ``U(-h, h)``, applied with the same PIL
  operations torchvision uses (ImageEnhance Brightness/Contrast/Color, HSV hue rotation);
* RandomGrayscale: ``convert('L')`` back to 3 channels;
* Gaussian blur: PIL ``ImageFilter.GaussianBlur(radius=sigma)``, ``sigma ~ U(blur_sigma)``, not
  scaled with the view size;
* Solarize: PIL ``ImageOps.solarize(threshold=128)``;
* ToTensor + Normalize(mean, std) in one fused step.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _draw_jitter(strengths: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    b, c, s, h = strengths
    factors = np.array(
        [
            rng.uniform(max(0.0, 1 - b), 1 + b),
            rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s),
            rng.uniform(-h, h),
        ]
    )
    return factors, rng.permutation(4)


# Layout of the per-view photometric parameter row (float32 [NUM_PARAMS]) the device path carries.
PARAM_NAMES = (
    "jitter",
    "brightness",
    "contrast",
    "saturation",
    "hue",  # jitter: 1.0 if ColorJitter applies
    "order0",
    "order1",
    "order2",
    "order3",  # op order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    "enabled_b",
    "enabled_c",
    "enabled_s",
    "enabled_h",  # op enabled (its strength > 0 and jitter on)
    "gray",
    "blur",
    "sigma",
    "solarize",
    "threshold",
)
NUM_PARAMS = len(PARAM_NAMES)


def draw_params(
    rng: np.random.Generator,
    *,
    jitter: Sequence[float],
    jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
    solarize_prob: float,
    solarize_threshold: int,
) -> np.ndarray:
    """The random photometric parameters of one view, float64 ``[NUM_PARAMS]`` (``PARAM_NAMES``).

    The draws (and their order) are exactly those of the PIL reference pipeline
    (``tests/_photometric_reference.py``): jitter coin, factors and
    permutation (only when jittering), grayscale coin, blur coin, sigma (only when blurring),
    solarize coin. Both the CPU path and the device path use this function, so the rest of the
    sample (cutout placement) sees the same generator state in both.
    """
    p = np.zeros(NUM_PARAMS)
    p[5:9] = np.arange(4)
    if rng.random() < jitter_prob:
        factors, order = _draw_jitter(jitter, rng)
        p[0], p[1:5], p[5:9] = 1.0, factors, order
        p[9:13] = [s > 0 for s in jitter]
    p[13] = rng.random() < grayscale_prob
    if rng.random() < blur_prob:
        p[14], p[15] = 1.0, rng.uniform(blur_sigma[0], blur_sigma[1])
    p[16] = rng.random() < solarize_prob
    p[17] = solarize_threshold
    return p


def normalise_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, offset)``, ``[3]`` each: ``x * scale - offset == (x / 255 - mean) / std``."""
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32)
    offset = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32)
    return scale, offset


_NORM_CACHE: dict = {}


def apply_params(arr: np.ndarray, p: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The colour pipeline with drawn parameters ``p`` (:func:`draw_params`) on uint8 ``[H, W, 3]``
    (any strides) -> normalised float32 ``[3, H, W]``: numba colour jitter + grayscale
    (:func:`soco_det.data.colour_kernels.colour_jitter_gray`), the bit-exact PIL Gaussian blur
    (:mod:`soco_det.data.box_blur`), then solarize + normalisation as one table lookup per value
    written straight into the output tensor's buffer."""
    # lazy: numba compiles these kernels on first use, so paths that never blur or jitter skip it
    from soco_det.data import box_blur
    from soco_det.data import colour_kernels as ck

    key = (tuple(mean), tuple(std))
    if key not in _NORM_CACHE:
        _NORM_CACHE[key] = normalise_constants(mean, std)
    scale, offset = _NORM_CACHE[key]
    if p[0] or p[13]:
        arr = ck.colour_jitter_gray(
            np.ascontiguousarray(arr), p[5:9].astype(np.int64), p[1:5].astype(np.float64), p[9:13] > 0, bool(p[13])
        )
    if p[14]:
        arr = box_blur.pil_gaussian_blur(np.ascontiguousarray(arr), float(p[15]))
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    ck.table_normalise(arr, ck.normalise_table(int(p[17]), bool(p[16]), scale, offset), out)
    return torch.from_numpy(out)


def denormalise(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``[3, H, W]`` normalised tensor -> uint8 ``[H, W, 3]`` for pictures."""
    t = tensor.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def cutout_regions(
    pixel_boxes: np.ndarray, rng: np.random.Generator, prob: float, ratio: Sequence[float], bound: int
) -> np.ndarray:
    """Cutout squares for a view's box rows (docs/method.md 2.6), padded duplicates included.

    Args:
        pixel_boxes: int ``[K, 4]`` inclusive pixel index boxes ``x1, y1, x2, y2`` in the view.
        prob: per-row probability of a cutout.
        ratio: the square's area is ``U(ratio) * (x2-x1+1)(y2-y1+1)``.
        bound: largest index a square may reach (inclusive).

    Returns:
        int64 ``[M, 4]`` inclusive regions ``x1, y1, x2, y2`` to zero, ``M <= K``: side
        ``s = round(sqrt(area))``, integer centre ``c`` uniform in the box, region
        ``[max(c - s//2, 0), min(c + s//2, bound)]``.
    """
    boxes = np.asarray(pixel_boxes, dtype=np.int64).reshape(-1, 4)
    k = boxes.shape[0]
    apply = rng.random(k) < prob
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    side = np.round(np.sqrt(rng.uniform(ratio[0], ratio[1], size=k) * np.maximum(area, 0))).astype(np.int64)
    cx = boxes[:, 0] + np.floor(rng.random(k) * np.maximum(boxes[:, 2] - boxes[:, 0] + 1, 1)).astype(np.int64)
    cy = boxes[:, 1] + np.floor(rng.random(k) * np.maximum(boxes[:, 3] - boxes[:, 1] + 1, 1)).astype(np.int64)
    half = side // 2
    regions = np.stack(
        [
            np.maximum(cx - half, 0),
            np.maximum(cy - half, 0),
            np.minimum(cx + half, bound),
            np.minimum(cy + half, bound),
        ],
        axis=1,
    )
    return regions[apply]


def apply_cutout(tensor: torch.Tensor, regions: np.ndarray) -> torch.Tensor:
    """Zero ``regions`` (inclusive ``x1, y1, x2, y2``) in every channel of a normalised ``[3, H, W]``
    tensor, so they take the dataset-mean colour. In place; returns the tensor."""
    for x1, y1, x2, y2 in regions.tolist():
        tensor[:, y1 : y2 + 1, x1 : x2 + 1] = 0.0
    return tensor
