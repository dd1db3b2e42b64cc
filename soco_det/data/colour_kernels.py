"""Fused per-pixel colour kernels (numba): the PIL/torchvision colour ops in one pass over the pixels.

The reference semantics are the PIL operations torchvision v1 applies to PIL images (and the
official SoCo code therefore uses); each step below reproduces PIL's integer arithmetic:

* brightness ``f``: ``ImageEnhance.Brightness`` = ``Image.blend(black, img, f)``;
* contrast ``f``: ``ImageEnhance.Contrast``: blend with the mean of the ``L`` image
  (``int(mean + 0.5)``);
* saturation ``f``: ``ImageEnhance.Color``: blend with the image's own ``L`` conversion;
* hue ``h``: ``convert('HSV')``, ``H += uint8(h * 255)`` (wrapping), ``convert('RGB')``;
* grayscale: ``convert('L').convert('RGB')``; solarize: ``x if x < t else 255 - x``;
* ``Image.blend`` computes ``a + f * (b - a)`` in float, clips to [0, 255] and truncates;
  ``L = (19595 r + 38470 g + 7471 b + 0x8000) >> 16``.

``tests/test_views_photometric.py`` checks the kernels against the PIL operations themselves.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np


def _njit(fn):
    try:
        return numba.njit(cache=True)(fn)
    except RuntimeError as exc:  # no writable cache location: compile in memory
        warnings.warn(f"numba cache unavailable ({exc}); compiling {fn.__name__} in memory", RuntimeWarning)
        return numba.njit(fn)


@_njit
def _blend(a: float, b: int, f: float) -> int:
    # PIL computes in C float (float32), alpha included
    t = np.float32(a) + np.float32(f) * np.float32(b - a)
    if t <= 0.0:
        return 0
    if t >= 255.0:
        return 255
    return int(t)


@_njit
def _luma(r: int, g: int, b: int) -> int:
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


@_njit
def _hue_shift(r: int, g: int, b: int, shift: int):
    maxc = max(r, max(g, b))
    minc = min(r, min(g, b))
    if maxc == minc:
        return r, g, b  # s = 0: H is 0 and the RGB conversion ignores it
    cr = np.float32(maxc - minc)
    s = cr / np.float32(maxc)
    rc = np.float32(maxc - r) / cr
    gc = np.float32(maxc - g) / cr
    bc = np.float32(maxc - b) / cr
    if r == maxc:
        h = bc - gc
    elif g == maxc:
        h = 2.0 + rc - bc
    else:
        h = 4.0 + gc - rc
    h = h / 6.0 + 1.0  # > 0, so fmod(h, 1) is h - floor(h)
    h = h - math.floor(h)
    uh = min(max(int(h * 255.0), 0), 255)
    us = min(max(int(s * 255.0), 0), 255)
    v = maxc
    uh = (uh + shift) & 255
    if us == 0:
        return v, v, v
    hf = np.float32(uh) * 6.0 / 255.0
    i = int(math.floor(hf))
    f = hf - i
    fs = np.float32(us) / 255.0
    # C round(): half away from zero (values are >= 0)
    p = min(max(int(math.floor(v * (1.0 - fs) + 0.5)), 0), 255)
    q = min(max(int(math.floor(v * (1.0 - fs * f) + 0.5)), 0), 255)
    t = min(max(int(math.floor(v * (1.0 - fs * (1.0 - f)) + 0.5)), 0), 255)
    i = i % 6
    if i == 0:
        return v, t, p
    if i == 1:
        return q, v, p
    if i == 2:
        return p, v, t
    if i == 3:
        return p, q, v
    if i == 4:
        return t, p, v
    return v, p, q


@_njit
def colour_jitter_gray(
    img: np.ndarray, order: np.ndarray, factors: np.ndarray, enabled: np.ndarray, gray: bool
) -> np.ndarray:
    """ColorJitter (ops in ``order``: 0 brightness, 1 contrast, 2 saturation, 3 hue, with their
    ``factors``; ops not ``enabled`` skipped) then optional grayscale. uint8 ``[H, W, 3]`` in/out."""
    h, w, _ = img.shape
    out = img.copy()
    mean = 0.0
    for k in range(order.shape[0]):
        op = order[k]
        f = factors[op]
        if not enabled[op]:
            continue
        if op == 1:  # contrast needs the mean luma of the current image first
            total = 0
            for y in range(h):
                for x in range(w):
                    total += _luma(out[y, x, 0], out[y, x, 1], out[y, x, 2])
            mean = float(int(total / (h * w) + 0.5))
        shift = int(f * 255) % 256 if op == 3 else 0
        for y in range(h):
            for x in range(w):
                r, g, b = int(out[y, x, 0]), int(out[y, x, 1]), int(out[y, x, 2])
                if op == 0:
                    r, g, b = _blend(0.0, r, f), _blend(0.0, g, f), _blend(0.0, b, f)
                elif op == 1:
                    r, g, b = _blend(mean, r, f), _blend(mean, g, f), _blend(mean, b, f)
                elif op == 2:
                    m = float(_luma(r, g, b))
                    r, g, b = _blend(m, r, f), _blend(m, g, f), _blend(m, b, f)
                else:
                    r, g, b = _hue_shift(r, g, b, shift)
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = r, g, b
    if gray:
        for y in range(h):
            for x in range(w):
                m = _luma(out[y, x, 0], out[y, x, 1], out[y, x, 2])
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = m, m, m
    return out


@_njit
def solarize_normalise(
    img: np.ndarray, threshold: int, solarize: bool, scale: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """Optional solarize, then ``x * scale[c] - offset[c]`` as float32 ``[3, H, W]`` (ToTensor +
    Normalize with ``scale = 1 / (255 std)``, ``offset = mean / std``)."""
    h, w, _ = img.shape
    out = np.empty((3, h, w), dtype=np.float32)
    for y in range(h):
        for x in range(w):
            for c in range(3):
                v = int(img[y, x, c])
                if solarize and v >= threshold:
                    v = 255 - v
                out[c, y, x] = v * scale[c] - offset[c]
    return out


# -- table normalisation: solarize + ToTensor + Normalize as one lookup per value ------------------
@_njit
def normalise_table(threshold: int, solarize: bool, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """float32 ``[3, 256]``: value ``v`` of channel ``c`` after optional solarize and normalisation,
    the same arithmetic as :func:`solarize_normalise`."""
    lut = np.empty((3, 256), dtype=np.float32)
    for c in range(3):
        for v0 in range(256):
            v = v0
            if solarize and v >= threshold:
                v = 255 - v
            lut[c, v0] = v * scale[c] - offset[c]
    return lut


@_njit
def table_normalise(img: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """uint8 ``[H, W, 3]`` (any strides) -> float32 ``[3, H, W]`` ``out`` through ``table`` ``[3, 256]``."""
    h, w, _ = img.shape
    for c in range(3):
        tc = table[c]
        oc = out[c]
        for y in range(h):
            for x in range(w):
                oc[y, x] = tc[img[y, x, c]]
