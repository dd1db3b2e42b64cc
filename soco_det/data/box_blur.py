"""PIL's ``ImageFilter.GaussianBlur(radius)`` re-implemented bit for bit as a numba kernel on
``uint8 [H, W, 3]`` arrays, without the PIL round trip (and without PIL's 4-byte pixels and the
two full-image transposes its vertical passes use).

PIL approximates a Gaussian of standard deviation ``radius`` by three passes of an *extended*
box filter per axis (Gwosdek et al., SSVM 2011): a box of integer radius ``r`` plus the two next
pixels weighted by the fractional part. In 8.24 fixed point, with ``R`` the float box radius:

* ``ww = uint32(2**24 / (2R + 1))`` (float32 division, truncated), ``fw = (2**24 - (2r+1) ww) // 2``;
* ``out[x] = (ww * sum(in[x-r .. x+r]) + fw * (in[x-r-1] + in[x+r+1]) + 2**23) >> 24`` with every
  index clamped to the line (edge pixels repeat);
* three passes along x (each rounded to uint8), then three along y.

``R`` comes from ``radius`` as in PIL's C code (float32): ``s2 = radius**2 / 3``,
``L = sqrt(12 s2 + 1)``, ``l = floor((L - 1) / 2)``,
``R = l + (2l + 1)(l(l + 1) - 3 s2) / (6 (s2 - (l + 1)**2))``.

``tests/test_views_speed_paths.py`` checks the output equals PIL's exactly.
"""

from __future__ import annotations

import math

import numpy as np

from soco_det.data.colour_kernels import _njit

PASSES = 3


def box_radius(radius: float, passes: int = PASSES) -> float:
    """PIL's extended-box radius for a Gaussian ``radius`` (float32 arithmetic as in its C code)."""
    f = np.float32
    sigma2 = f(f(radius) * f(radius) / f(passes))
    big_l = f(math.sqrt(12.0 * float(sigma2) + 1.0))
    small_l = f(math.floor((float(big_l) - 1.0) / 2.0))
    a = f(f(2 * small_l + 1) * f(small_l * f(small_l + 1) - f(3) * sigma2))
    a = f(a / f(f(6) * f(sigma2 - f(small_l + 1) * f(small_l + 1))))
    return float(f(small_l + a))


def box_weights(box_r: float) -> tuple[int, int, int]:
    """``(r, ww, fw)``: integer radius and the 8.24 fixed-point weights of the inner and far pixels."""
    r = int(box_r)
    ww = int(np.float32(1 << 24) / np.float32(np.float32(box_r) * np.float32(2) + np.float32(1)))
    fw = ((1 << 24) - (2 * r + 1) * ww) // 2
    return r, ww, fw


@_njit
def _cols_pass(src: np.ndarray, dst: np.ndarray, r: int, ww: int, fw: int) -> None:
    """One extended-box pass along y of int32 ``[H, W*C]`` ``src`` into ``dst``: whole rows at a
    time, so the inner loop runs over contiguous memory."""
    h, n = src.shape
    acc = np.zeros(n, dtype=np.int64)
    for i in range(-r - 1, r):
        row = src[min(max(i, 0), h - 1)]
        for k in range(n):
            acc[k] += row[k]
    for y in range(h):
        add = src[min(y + r, h - 1)]
        sub = src[max(y - r - 1, 0)]
        far = src[min(y + r + 1, h - 1)]
        out = dst[y]
        for k in range(n):
            acc[k] += add[k] - sub[k]
            out[k] = (acc[k] * ww + (sub[k] + far[k]) * fw + (1 << 23)) >> 24


@_njit
def blur_axis0(img: np.ndarray, r: int, ww: int, fw: int, passes: int) -> np.ndarray:
    """``passes`` extended-box passes along axis 0 of uint8 ``[N, M]`` (every column a line)."""
    a = img.astype(np.int32)
    b = np.empty_like(a)
    for _ in range(passes):
        _cols_pass(a, b, r, ww, fw)
        a, b = b, a
    return a.astype(np.uint8)


def pil_gaussian_blur(img: np.ndarray, radius: float) -> np.ndarray:
    """``np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))`` for uint8
    ``[H, W, C]``, computed directly (same bits). The x passes run on the transposed image so that
    both axes use the row-vectorised :func:`_cols_pass`."""
    if radius == 0:
        return img.copy()
    r, ww, fw = box_weights(box_radius(radius))
    h, w, c = img.shape
    t = np.ascontiguousarray(img.transpose(1, 0, 2)).reshape(w, h * c)
    t = blur_axis0(t, r, ww, fw, PASSES).reshape(w, h, c)
    u = np.ascontiguousarray(t.transpose(1, 0, 2)).reshape(h, w * c)
    return blur_axis0(u, r, ww, fw, PASSES).reshape(h, w, c)
