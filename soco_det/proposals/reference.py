"""Slow reference selective search: PyPI ``selectivesearch`` 0.4 as the official SoCo code runs it.

The official SoCo repository vendors AlpacaDB's ``selectivesearch`` 0.4 with exactly the changes
listed in docs/method.md 1.1:

1. ``_calc_texture_hist`` bins the LBP codes over ``(0, 255)`` instead of ``(0, 1)``
   (AlpacaDB issue #30);
2. Python-3 fixes that change no result (``list(...)`` around dict iterations, a comprehension
   instead of ``filter``) -- PyPI 0.4 already runs unchanged on Python 3 because it never deletes
   from a dict while iterating it, so nothing needs adapting here;
3. the boxes ``(min_x, min_y, max_x - min_x, max_y - min_y)`` are returned as well.

This module *is* the package plus change 1: it calls ``selectivesearch.selective_search`` with the
module's ``_calc_texture_hist`` swapped for the (0, 255) version for the duration of the call.
It exists to test :mod:`soco_det.proposals.selective_search` against, and it is slow
(about a second for a 500x333 photo). ``selectivesearch`` is a test-only dependency.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

__all__ = ["reference_selective_search"]

# The package reads ``_calc_texture_hist`` as a module global, so the swap is process-wide while a
# call runs; the lock keeps two threads from interleaving swap and restore.
_PATCH_LOCK = threading.Lock()


def _import_package():
    try:
        from selectivesearch import selectivesearch as package
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the reference selective search needs the test-only package `selectivesearch` 0.4 "
            "(pip install selectivesearch==0.4); the fast implementation "
            "soco_det.proposals.selective_search does not"
        ) from exc
    return package


def _calc_texture_hist_0_255(img: np.ndarray) -> np.ndarray:
    """SoCo's ``_calc_texture_hist``: 10 bins per channel over (0, 255), L1-normalised.

    ``img`` is ``[n_pixels, 3]`` float64 LBP codes of one region. Identical to 0.4's function
    except for the histogram range.
    """
    bins = 10
    hist = np.array([])
    for channel in (0, 1, 2):
        hist = np.concatenate([hist] + [np.histogram(img[:, channel], bins, (0.0, 255.0))[0]])
    return hist / len(img)


def reference_selective_search(
    image: np.ndarray, scale: float = 300, sigma: float = 0.9, min_size: int = 100
) -> np.ndarray:
    """Run the official (SoCo-modified ``selectivesearch`` 0.4) selective search.

    Args:
        image: ``[H, W, 3]`` uint8 RGB image.
        scale, sigma, min_size: Felzenszwalb parameters; the defaults are the ones SoCo used
            (docs/method.md 1.1), not the package's own defaults.

    Returns:
        ``[N, 4]`` int32 rects ``(x, y, w, h)`` with ``w = max_x - min_x`` and ``h = max_y - min_y``
        (inclusive pixel indices), one per region in the package's region order: the
        Felzenszwalb segments in raster order of first appearance, then every merged region in
        merge order, without de-duplication.
    """
    package = _import_package()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    with _PATCH_LOCK:
        original = package._calc_texture_hist
        package._calc_texture_hist = _calc_texture_hist_0_255
        try:
            with warnings.catch_warnings():
                # skimage warns that LBP on float images may be fragile; the package does exactly that.
                warnings.simplefilter("ignore", UserWarning)
                _, regions = package.selective_search(image, scale=scale, sigma=sigma, min_size=min_size)
        finally:
            package._calc_texture_hist = original
    rects = np.array([region["rect"] for region in regions], dtype=np.int32)
    return rects.reshape(-1, 4)
