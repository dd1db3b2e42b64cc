"""The PIL reference of the views' colour pipeline: the official torchvision-v1 composition written
with PIL operations only (ColorJitter, RandomGrayscale, GaussianBlur, Solarize, ToTensor +
Normalize). :mod:`soco_det.data.photometric` must give the same results (tests/test_views_photometric.py),
as :mod:`soco_det.proposals.reference` is the reference of the fast selective search."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from soco_det.data.photometric import _draw_jitter, apply_params, draw_params


def _adjust_hue(img: Image.Image, hue: float) -> Image.Image:
    """torchvision's PIL hue rotation: shift the uint8 H channel by ``hue * 255`` with wrap-around."""
    h, s, v = img.convert("HSV").split()
    shift = int(hue * 255) % 256
    h_arr = (np.asarray(h, dtype=np.uint8) + np.uint8(shift)).astype(np.uint8)  # uint8 wraps
    return Image.merge("HSV", (Image.fromarray(h_arr, "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, strengths: Sequence[float], rng: np.random.Generator) -> Image.Image:
    """ColorJitter(brightness, contrast, saturation, hue) on an RGB PIL image, random op order."""
    b, c, s, h = strengths
    factors, order = _draw_jitter(strengths, rng)
    for op in order:
        f = factors[op]
        if op == 0 and b > 0:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif op == 1 and c > 0:
            img = ImageEnhance.Contrast(img).enhance(f)
        elif op == 2 and s > 0:
            img = ImageEnhance.Color(img).enhance(f)
        elif op == 3 and h > 0:
            img = _adjust_hue(img, f)
    return img


def augment(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    jitter: Sequence[float],
    jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
    solarize_prob: float,
    solarize_threshold: int,
) -> Image.Image:
    """The colour pipeline of one view (RGB PIL in, RGB PIL out), with PIL operations only: the
    reference for :func:`augment_tensor`."""
    if rng.random() < jitter_prob:
        img = color_jitter(img, jitter, rng)
    if rng.random() < grayscale_prob:
        img = img.convert("L").convert("RGB")
    if rng.random() < blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(blur_sigma[0], blur_sigma[1]))))
    if rng.random() < solarize_prob:
        img = ImageOps.solarize(img, threshold=solarize_threshold)
    return img


def to_normalised_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL ``H x W`` -> float32 ``[3, H, W]``, ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(3, 1, 1)
    offset = torch.tensor([m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    return arr.mul_(scale).sub_(offset)


def augment_tensor(
    img: Image.Image | np.ndarray,
    rng: np.random.Generator,
    *,
    jitter: Sequence[float],
    jitter_prob: float,
    grayscale_prob: float,
    blur_prob: float,
    blur_sigma: Sequence[float],
    solarize_prob: float,
    solarize_threshold: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """What the sampler does for one view (:func:`draw_params` then :func:`apply_params`: fused numba
    colour passes, PIL's blur re-implemented bit for bit), to compare with :func:`augment` +
    :func:`to_normalised_tensor` on the same random draws."""
    p = draw_params(
        rng,
        jitter=jitter,
        jitter_prob=jitter_prob,
        grayscale_prob=grayscale_prob,
        blur_prob=blur_prob,
        blur_sigma=blur_sigma,
        solarize_prob=solarize_prob,
        solarize_threshold=solarize_threshold,
    )
    return apply_params(np.asarray(img, dtype=np.uint8), p, mean, std)
